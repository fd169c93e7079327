"""DPO and every loss variant of TRL 1.16's `DPOTrainer` on chosen/rejected pairs.

The losses themselves are small functions in `pref.plugins.dpo_losses`; this
module scores the pairs and holds the objective. `tests/test_dpo_loss.py`
checks the numbers against TRL itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, PAIRS, REFERENCE_DISTRIBUTIONS, REFERENCE_LOGPS, Objective, ObjectiveNeeds, PairBatch, Policy, Reference
from pref.plugins.moving_reference import BEMA, MovesReference, SyncReference
from pref.plugins.dpo_losses import (  # noqa: F401  (dpo_loss and LOSS_TYPES are this plugin's public maths)
    LOSS_TYPES,
    check_options,
    dpo_loss,
    length_desensitised_logps,
    loss_types_of,
    loss_weights_of,
    wpo_weights,
)
from pref.sequences import Logps, Sequences



def pair_logps(
    policy: Policy, reference: Reference | None, batch: PairBatch, with_logits: bool = False
) -> tuple[Logps, Logps, Logps | None, Logps | None]:
    """Score a pair batch with one policy forward pass over the 2B rows (chosen first).

    Returns the policy's chosen and rejected `Logps` (with grad; with the [B, T, V]
    logits when `with_logits`) and the reference's (no grad), or None for those when
    `reference` is None.
    """
    n = len(batch)
    pad_id = policy.tokenizer.pad_token_id
    sequences = Sequences.concat([batch.chosen, batch.rejected], pad_id=0 if pad_id is None else pad_id)
    logps = policy.logps(sequences, with_logits=with_logits) if with_logits else policy.logps(sequences)
    chosen, rejected = logps.select(slice(0, n)), logps.select(slice(n, None))
    if reference is None:
        return chosen, rejected, None, None
    with torch.no_grad():
        reference_logps = reference.logps(sequences)
    return chosen, rejected, reference_logps.select(slice(0, n)), reference_logps.select(slice(n, None))


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, float]:
    """TRL's figures of a pair loss: the implicit rewards' means, accuracy and margin, and the log-probs the loss scored."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }


class DPO(MovesReference, Objective):
    """Direct preference optimization on chosen/rejected pairs, with every loss type of TRL 1.16's DPOTrainer.

    Options (TRL's `DPOConfig` names):
        beta: strength of the pull towards the reference (default 0.1).
        loss_type: one of `pref.plugins.dpo_losses.LOSS_TYPES` ("sigmoid" by default; cDPO
            with label_smoothing), or several separated by commas, added with `loss_weights`.
        loss_weights: one weight per loss type, e.g. "0.8,0.2,1.0" (default 1.0 each).
        label_smoothing: label noise for sigmoid (cDPO), robust, exo_pair and the aot losses.
        sft_weight: weight of an extra negative log-likelihood term on the chosen
            completions (each answer's per-token average, averaged over the answers: every
            answer weighs alike, however long), which keeps their likelihood from falling.
        reference_free: compare against no reference (the reference log-probs are 0).
        ld_alpha: LD-DPO's weight of the tokens past the shorter answer's length (None: off).
        use_weighting: WPO's weighting of each pair by how likely the policy is to produce it.
        f_divergence_type, f_alpha_divergence_coef: f-DPO's divergence ("reverse_kl" is DPO).
        discopop_tau: DiscoPOP's temperature (0.05).
        sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps: TR-DPO: every
            `ref_model_sync_steps` optimizer steps the frozen reference moves towards the
            policy, reference <- alpha * policy + (1 - alpha) * reference (a frozen reference model;
            checkpoints keep the moved reference, so a resumed run goes on from it).
        bema_reference: the reference is BEMA's bias-corrected moving average of the policy's weights
            (TRL's `trl.experimental.bema_for_ref_model`; `pref.plugins.moving_reference`), with `bema_update_freq`,
            `bema_ema_power`, `bema_bias_power`, `bema_lag`, `bema_update_after`, `bema_multiplier`,
            `bema_min_ema_multiplier`, `ref_model_update_freq` and `ref_model_update_after` (TRL's
            defaults 400, 0.5, 0.2, 10, 0, 1.0, 0.0, 400, 0). It keeps three float32 copies of the
            trained weights on the CPU, which checkpoints keep too.
    """

    needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=PAIRS, reference_optional=True)  # --reference none: reference-free

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference_free: bool = False,
        loss_weights: str | float | list[float] | None = None,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        bema_reference: bool = False,
        bema_update_freq: int = 400,
        bema_ema_power: float = 0.5,
        bema_bias_power: float = 0.2,
        bema_lag: float = 10.0,
        bema_update_after: int = 0,
        bema_multiplier: float = 1.0,
        bema_min_ema_multiplier: float = 0.0,
        ref_model_update_freq: int = 400,
        ref_model_update_after: int = 0,
    ):
        loss_types = loss_types_of(loss_type)
        check_options(beta, loss_types, label_smoothing, loss_weights, f_divergence_type, ld_alpha, use_weighting, discopop_tau)
        if sft_weight < 0:
            raise PrefError(f"sft_weight must not be negative, got {sft_weight}")
        if (sync_ref_model or bema_reference) and reference_free:
            raise PrefError("sync_ref_model and bema_reference move the reference: drop reference_free or them")
        if sync_ref_model and bema_reference:
            raise PrefError("sync_ref_model and bema_reference both move the reference: choose one")
        self.moving = SyncReference(ref_model_mixup_alpha, ref_model_sync_steps) if sync_ref_model else BEMA(
            bema_update_freq, bema_ema_power, bema_bias_power, bema_lag, bema_update_after, bema_multiplier, bema_min_ema_multiplier,
            ref_model_update_freq, ref_model_update_after) if bema_reference else None
        self.beta = beta
        self.loss_type = loss_type if isinstance(loss_type, str) else ",".join(loss_types)
        self.loss_types = loss_types
        self.loss_weights = loss_weights_of(loss_weights, len(loss_types))
        self.label_smoothing = label_smoothing
        self.sft_weight = sft_weight
        self.reference_free = reference_free
        self.ld_alpha = ld_alpha
        self.use_weighting = use_weighting
        self.f_divergence_type = f_divergence_type
        self.f_alpha_divergence_coef = f_alpha_divergence_coef
        self.discopop_tau = discopop_tau
        if reference_free:
            self.needs = replace(self.needs, reference=NO_REFERENCE)  # the loop loads no reference
        elif ld_alpha is not None or sync_ref_model or bema_reference:
            # per-token reference log-probs (LD-DPO) or a reference that moves (TR-DPO, BEMA): only a frozen model will do
            self.needs = replace(self.needs, reference=REFERENCE_DISTRIBUTIONS, moves_reference=sync_ref_model or bema_reference)

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean DPO loss over the pairs (plus the weighted SFT term) and TRL-named metrics.

        With `sft_weight`, the two terms are logged too: `loss/dpo` and `nll_loss` (the chosen answers' NLL).

        Works on any `PairBatch`, so online objectives can build pairs and call it.
        Without a reference (`reference_free`, or the run's `reference: none`)
        the reference log-probs count as 0.
        """
        reference = None if self.reference_free else reference
        frozen_only = "ld_alpha" if self.ld_alpha is not None else self.moving.option if self.moving is not None else None
        if reference is not None and frozen_only and not reference.has_logits:
            raise PrefError(f"{frozen_only} needs a frozen reference model, not cached log-probs: use --reference model")
        chosen, rejected, reference_chosen, reference_rejected = pair_logps(policy, reference, batch, with_logits=self.use_weighting)
        chosen_logps, rejected_logps = chosen.sequence, rejected.sequence
        if self.ld_alpha is not None:
            chosen_logps, rejected_logps = length_desensitised_logps(chosen.tokens, rejected.tokens, chosen.mask, rejected.mask, self.ld_alpha)
        if reference_chosen is None or reference_rejected is None:
            reference_chosen_logps = torch.zeros_like(chosen_logps)
            reference_rejected_logps = torch.zeros_like(rejected_logps)
        elif self.ld_alpha is not None:
            reference_chosen_logps, reference_rejected_logps = length_desensitised_logps(
                reference_chosen.tokens.to(chosen_logps.device), reference_rejected.tokens.to(chosen_logps.device),
                chosen.mask, rejected.mask, self.ld_alpha,
            )
        else:
            reference_chosen_logps = reference_chosen.sequence.to(chosen_logps.device)
            reference_rejected_logps = reference_rejected.sequence.to(rejected_logps.device)

        pair_weights = None
        if self.use_weighting:
            assert chosen.logits is not None and rejected.logits is not None
            pair_weights = wpo_weights(chosen.tokens, chosen.logits, chosen.mask) * wpo_weights(rejected.tokens, rejected.logits, rejected.mask)
        chosen_token_nll = None
        if "sft" in self.loss_types:
            # TRL's sft loss type: mean over every chosen completion token of the batch
            chosen_token_nll = -chosen.tokens[chosen.mask.bool()].mean()

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps,
            rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_types,
            label_smoothing=self.label_smoothing,
            chosen_lengths=chosen.mask.sum(-1),
            rejected_lengths=rejected.mask.sum(-1),
            loss_weights=self.loss_weights,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.discopop_tau,
            chosen_token_nll=chosen_token_nll,
            pair_weights=pair_weights,
        )
        preference_loss = losses.mean()
        metrics = pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
        if not self.sft_weight:
            return preference_loss, metrics

        nll_loss = -chosen.mean.mean()
        metrics["loss/dpo"] = preference_loss.item()
        metrics["nll_loss"] = nll_loss.item()  # TRL's name for CPO's and ORPO's NLL term, which cpo and orpo log too
        return preference_loss + self.sft_weight * nll_loss, metrics


@hookimpl
def register_objectives(register):
    register("dpo", DPO)
