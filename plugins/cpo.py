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
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, PAIRS, Objective, ObjectiveNeeds, PairBatch, Policy, Reference
from pref.plugins.dpo import pair_logps, pair_metrics
from pref.plugins.sft import sft_loss

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



class CPO(Objective):
    """CPO, SimPO and AlphaPO: reference-free preference losses plus an NLL term (TRL's CPOTrainer).

    Options (TRL's `CPOConfig` names):
        loss_type: "sigmoid" (CPO, default), "hinge", "ipo", "simpo" or "alphapo" (simpo with
            the AlphaPO reward and no NLL term, as TRL sets it).
        beta: inverse temperature (default 0.1; SimPO's paper uses 2 to 2.5).
        label_smoothing: label noise for sigmoid and simpo (0).
        cpo_alpha: weight of the chosen answers' NLL (default 1.0; 0 for SimPO as published).
        simpo_gamma: SimPO's target reward margin (0.5).
        alpha: AlphaPO's reward shape (0: log-prob rewards).
    """

    needs = ObjectiveNeeds(reference=NO_REFERENCE, data=PAIRS)

    def __init__(
        self,
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
    ):
        check_options(beta, loss_type, label_smoothing, cpo_alpha)
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.cpo_alpha = 0.0 if loss_type == "alphapo" else cpo_alpha
        self.simpo_gamma, self.alpha = simpo_gamma, alpha

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean CPO loss + cpo_alpha x the chosen completions' NLL, with TRL's metrics."""
        chosen, rejected, _, _ = pair_logps(policy, None, batch)
        averaged = self.loss_type in AVERAGED_LOSS_TYPES
        chosen_logps = chosen.mean if averaged else chosen.sequence
        rejected_logps = rejected.mean if averaged else rejected.sequence
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen_logps, rejected_logps, self.beta, self.loss_type, self.label_smoothing, self.simpo_gamma, self.alpha,
        )
        nll = sft_loss(chosen.tokens, chosen.mask) if self.cpo_alpha else torch.zeros((), device=losses.device)
        metrics = {**pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps), "nll_loss": nll.item()}
        return losses.mean() + self.cpo_alpha * nll, metrics


@hookimpl
def register_objectives(register):
    register("cpo", CPO)
