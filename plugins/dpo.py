"""DPO and its close variants (cDPO, IPO, hinge/SLiC, robust DPO) on chosen/rejected pairs.

The maths follows TRL 1.16's `DPOTrainer` (and its older conservative
`sigmoid` loss with label smoothing); `tests/test_dpo_loss.py` checks the
numbers against TRL itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, PAIRS, REFERENCE_LOGPS, Objective, ObjectiveNeeds, PairBatch, Policy, Reference
from pref.sequences import Logps, Sequences

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def check_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise `PrefError` for a loss type or hyper-parameter the DPO loss cannot use."""
    if loss_type not in LOSS_TYPES:
        raise PrefError(f"unknown DPO loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise PrefError(f"DPO beta must be positive, got {beta}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise PrefError(f"label_smoothing only applies to loss_type 'sigmoid' or 'robust', not {loss_type!r}; set it to 0")
    if not 0.0 <= label_smoothing < 0.5:
        # at 0.5 the labels carry no information (and robust DPO divides by 1 - 2 * label_smoothing)
        raise PrefError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: [B] the same for the rejected completions.
        reference_chosen_logps: [B] summed log-probs of the chosen completions under the reference.
        reference_rejected_logps: [B] the same for the rejected completions.
        beta: strength of the pull towards the reference (IPO's tau).
        loss_type: one of
            "sigmoid": DPO, Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290), Eq. 7.
                With `label_smoothing` > 0 it is conservative DPO (cDPO, Mitchell 2023,
                https://ericmitchell.ai/cdpo.pdf): the labels are assumed flipped with that probability.
            "ipo": IPO, Azar et al. 2023 (https://arxiv.org/abs/2310.12036), Eq. 17, on per-token
                average log-ratios when the lengths are given (as TRL does).
            "hinge": the hinge loss of SLiC, Zhao et al. 2023 (https://arxiv.org/abs/2305.10425).
            "robust": robust DPO, Chowdhury et al. 2024 (https://arxiv.org/abs/2403.00409), Eq. 8:
                an unbiased loss when labels are flipped with probability `label_smoothing`.
        label_smoothing: probability that a preference label is wrong, in [0, 0.5); sigmoid and robust only.
        reference_free: ignore the reference log-probs (treat them as 0).
        chosen_lengths: [B] completion token counts, used by "ipo" only; None means 1 (no normalisation).
        rejected_lengths: [B] the same for the rejected completions.

    Returns:
        losses: [B] one loss per pair (the caller averages).
        chosen_rewards: [B] beta * (policy - reference) log-probs of the chosen completions, detached.
        rejected_rewards: [B] the same for the rejected completions.
    """
    check_options(beta, loss_type, label_smoothing)
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)

    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(margin)
        flipped = -label_smoothing * F.logsigmoid(-margin)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    else:  # ipo
        # Summed log-probs would make the squared loss grow with completion length;
        # TRL (with the IPO authors' agreement) averages over tokens instead.
        if chosen_lengths is not None:
            chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1)
        if rejected_lengths is not None:
            rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_logps(
    policy: Policy, reference: Reference | None, batch: PairBatch
) -> tuple[Logps, Logps, Logps | None, Logps | None]:
    """Score a pair batch with one policy forward pass over the 2B rows (chosen first).

    Returns the policy's chosen and rejected `Logps` (with grad) and the
    reference's (no grad), or None for those when `reference` is None.
    """
    n = len(batch)
    pad_id = policy.tokenizer.pad_token_id
    sequences = Sequences.concat([batch.chosen, batch.rejected], pad_id=0 if pad_id is None else pad_id)
    logps = policy.logps(sequences)
    chosen, rejected = logps.select(slice(0, n)), logps.select(slice(n, None))
    if reference is None:
        return chosen, rejected, None, None
    with torch.no_grad():
        reference_logps = reference.logps(sequences)
    return chosen, rejected, reference_logps.select(slice(0, n)), reference_logps.select(slice(n, None))


class DPO(Objective):
    """Direct preference optimization on chosen/rejected pairs (sigmoid, cDPO, IPO, hinge or robust loss).

    Options:
        beta: strength of the pull towards the reference (default 0.1).
        loss_type: "sigmoid" (DPO; cDPO with label_smoothing), "ipo", "hinge" or "robust".
        label_smoothing: probability that a label is wrong, for sigmoid (cDPO) and robust.
        sft_weight: weight of an extra negative log-likelihood term on the chosen
            completions (per-token average), which keeps their likelihood from falling.
        reference_free: compare against no reference (the reference log-probs are 0).
    """

    needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=PAIRS)

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference_free: bool = False,
    ):
        check_options(beta, loss_type, label_smoothing)
        if sft_weight < 0:
            raise PrefError(f"sft_weight must not be negative, got {sft_weight}")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.sft_weight = sft_weight
        self.reference_free = reference_free
        if reference_free:
            self.needs = replace(self.needs, reference=NO_REFERENCE)  # the loop loads no reference

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean DPO loss over the pairs (plus the weighted SFT term) and TRL-named metrics.

        Works on any `PairBatch`, so online objectives can build pairs and call it.
        Without a reference (`reference_free`, or the run's `reference: none`)
        the reference log-probs count as 0.
        """
        reference = None if self.reference_free else reference
        chosen, rejected, reference_chosen, reference_rejected = pair_logps(policy, reference, batch)
        if reference_chosen is None or reference_rejected is None:
            reference_chosen_logps = torch.zeros_like(chosen.sequence)
            reference_rejected_logps = torch.zeros_like(rejected.sequence)
        else:
            reference_chosen_logps = reference_chosen.sequence.to(chosen.sequence.device)
            reference_rejected_logps = reference_rejected.sequence.to(rejected.sequence.device)

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen.sequence,
            rejected.sequence,
            reference_chosen_logps,
            reference_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=chosen.mask.sum(-1),
            rejected_lengths=rejected.mask.sum(-1),
        )
        preference_loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen.sequence.detach().mean().item(),
            "logps/rejected": rejected.sequence.detach().mean().item(),
        }
        if not self.sft_weight:
            return preference_loss, metrics

        sft_loss = -chosen.mean.mean()
        metrics["loss/dpo"] = preference_loss.item()
        metrics["loss/sft"] = sft_loss.item()
        return preference_loss + self.sft_weight * sft_loss, metrics


@hookimpl
def register_objectives(register):
    register("dpo", DPO)
