"""CPO and SimPO: reference-free preference losses with an NLL term (TRL 1.16's `trl.experimental.cpo`).

CPO, Xu et al. 2024 (https://arxiv.org/abs/2401.08417): DPO's losses on the policy's own
log-probs (no reference) plus `cpo_alpha` times the chosen answers' NLL. SimPO, Meng et
al. 2024 (https://arxiv.org/abs/2405.14734): per-token average log-probs and a target
margin `simpo_gamma`. AlphaPO, Gupta et al. 2025 (https://arxiv.org/abs/2501.03884):
the reward (1 - p^-alpha) / alpha in place of log p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pref.errors import PrefError

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
#: Loss types scored on per-token average log-probs (TRL's `average_log_prob`); the others on sums.
AVERAGED_LOSS_TYPES = ("ipo", "simpo", "alphapo")


def check_options(beta: float, loss_type: str, label_smoothing: float, cpo_alpha: float) -> None:
    """Raise `PrefError` for an option CPO cannot use."""
    if loss_type not in LOSS_TYPES:
        raise PrefError(f"unknown CPO loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise PrefError(f"cpo: beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise PrefError(f"cpo: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "simpo", "alphapo"):
        raise PrefError(f"cpo: label_smoothing only applies to loss_type sigmoid, simpo or alphapo, not {loss_type!r}; set it to 0")
    if cpo_alpha < 0:
        raise PrefError(f"cpo: cpo_alpha (the NLL weight) must not be negative, got {cpo_alpha}")


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair CPO/SimPO losses and rewards, as TRL's `CPOTrainer.cpo_loss`.

    Args:
        policy_chosen_logps: [B] log-probs of the chosen answers: summed for sigmoid and hinge,
            per-token averages for ipo and simpo (see AVERAGED_LOSS_TYPES).
        policy_rejected_logps: [B] the same for the rejected answers.
        beta: inverse temperature (IPO's tau).
        loss_type: "sigmoid" (CPO, Eq. 3 of the paper), "hinge", "ipo", "simpo" (the margin
            r_chosen - r_rejected - gamma / beta), or "alphapo" (simpo with the AlphaPO reward;
            set `alpha`, and no NLL term, as TRL does).
        label_smoothing: label noise for sigmoid and simpo.
        simpo_gamma: SimPO's target reward margin.
        alpha: AlphaPO's reward shape; 0 keeps the log-prob reward.

    Returns:
        losses: [B]; the CPO loss is their mean plus cpo_alpha times the chosen NLL.
        chosen_rewards: [B] beta * the chosen answers' reward, detached.
        rejected_rewards: [B] the same for the rejected answers.
    """
    check_options(beta, loss_type, label_smoothing, 0.0)
    if alpha != 0.0:
        chosen_reward = (1 - torch.exp(policy_chosen_logps).pow(-alpha)) / alpha
        rejected_reward = (1 - torch.exp(policy_rejected_logps).pow(-alpha)) / alpha
    else:
        chosen_reward, rejected_reward = policy_chosen_logps, policy_rejected_logps
    logits = chosen_reward - rejected_reward
    if loss_type in ("simpo", "alphapo"):
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo", "alphapo"):
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo, Eq. 17 of Azar et al. 2023 with beta as tau
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_reward.detach(), beta * rejected_reward.detach()

