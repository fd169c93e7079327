"""KTO: Kahneman-Tversky optimisation on unpaired desirable and undesirable answers (Ethayarajh et al. 2024).

https://arxiv.org/abs/2402.01306. Each answer is labelled desirable or undesirable on
its own; the policy's implicit reward beta * log(pi / pi_ref) of a desirable answer is
pushed above a reference point z, an undesirable one's below it. z is an estimate of
KL(pi || pi_ref), taken as TRL 1.16's `KTOTrainer` does: from mismatched rows of the
same batch (each prompt with the previous row's answer), without grad, clamped at 0.
"""

from __future__ import annotations

import torch

from pref.errors import PrefError

LOSS_TYPES = ("kto", "apo_zero_unpaired")


def check_options(beta: float, desirable_weight: float, undesirable_weight: float, loss_type: str) -> None:
    """Raise `PrefError` for a strength, weight or loss type KTO cannot use."""
    if loss_type not in LOSS_TYPES:
        raise PrefError(f"unknown KTO loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise PrefError(f"kto: beta must be positive, got {beta}")
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if value < 0:
            raise PrefError(f"kto: {name} must not be negative, got {value}")


def mismatched_rows(n: int) -> list[int]:
    """Which row's answer each prompt gets for the KL estimate: the previous row's, the first gets the last's.

    TRL's rotation of the completions by one within a batch: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
    n = 3 -> [2, 0, 1].
    """
    return [n - 1] + list(range(n - 1)) if n else []


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    reference_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-answer KTO losses, implicit rewards and the KL reference point.

    Args:
        policy_chosen_logps: [C] summed log-probs of the desirable answers under the policy.
        policy_rejected_logps: [R] the same for the undesirable answers (C + R rows in all; either may be 0).
        reference_chosen_logps: [C] the desirable answers' log-probs under the reference.
        reference_rejected_logps: [R] the same for the undesirable answers.
        policy_kl_logps: [M] log-probs of mismatched prompt/answer rows under the policy (see
            `mismatched_rows`); needed by "kto", treated as constants.
        reference_kl_logps: [M] the same rows under the reference.
        beta: scale of the implicit reward.
        desirable_weight, undesirable_weight: the paper's lambda_D and lambda_U.
        loss_type: "kto" (Eq. 7 of the paper), or "apo_zero_unpaired" (APO-zero on unpaired
            answers, D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266: no KL point).

    Returns:
        losses: [C + R] desirable rows first, weighted; TRL's loss is their mean.
        chosen_rewards: [C] beta * log-ratio of the desirable answers, detached.
        rejected_rewards: [R] the same for the undesirable answers.
        kl: [] the reference point z = max(0, mean(policy_kl_logps - reference_kl_logps)), detached (0 without KL).
    """
    check_options(beta, desirable_weight, undesirable_weight, loss_type)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    if loss_type == "kto":
        if policy_kl_logps is None or reference_kl_logps is None:
            raise PrefError("loss_type kto needs the mismatched rows' log-probs (policy_kl_logps, reference_kl_logps)")
        kl = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        kl = chosen_logratios.new_zeros(())
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl
