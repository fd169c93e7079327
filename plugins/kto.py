"""KTO: Kahneman-Tversky optimisation on unpaired desirable and undesirable answers (Ethayarajh et al. 2024).

https://arxiv.org/abs/2402.01306. Each answer is labelled desirable or undesirable on
its own; the policy's implicit reward beta * log(pi / pi_ref) of a desirable answer is
pushed above a reference point z, an undesirable one's below it. z is an estimate of
KL(pi || pi_ref), taken as TRL 1.16's `KTOTrainer` does: from mismatched rows of the
same batch (each prompt with the previous row's answer), without grad, averaged over
the processes' batches, clamped at 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import REFERENCE_DISTRIBUTIONS, REFERENCE_LOGPS, SETS, LabeledBatch, Objective, ObjectiveNeeds, Policy, Processes, Reference
from pref.plugins.moving_reference import MovesReference, SyncReference
from pref.reference import CachedReference
from pref.sequences import Sequences

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
    processes: Processes | None = None,
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
        processes: the run's; each one's mean log-ratio of its mismatched rows is averaged over
            them before the clamp, as TRL gathers it (one process by default).

    Returns:
        losses: [C + R] desirable rows first, weighted; TRL's loss is their mean.
        chosen_rewards: [C] beta * log-ratio of the desirable answers, detached.
        rejected_rewards: [R] the same for the undesirable answers.
        kl: [] the reference point z = max(0, mean over processes of mean(policy_kl_logps - reference_kl_logps)),
            detached (0 without KL).
    """
    check_options(beta, desirable_weight, undesirable_weight, loss_type)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    if loss_type == "kto":
        if policy_kl_logps is None or reference_kl_logps is None:
            raise PrefError("loss_type kto needs the mismatched rows' log-probs (policy_kl_logps, reference_kl_logps)")
        kl = (policy_kl_logps - reference_kl_logps).mean().detach()
        # one reference point for the whole step's batch, however many processes share it (TRL's gather, then mean)
        kl = (processes or Processes()).mean(kl.reshape(1)).reshape(()).to(kl.device).clamp(min=0)
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        kl = chosen_logratios.new_zeros(())
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def swap_completions(sequences: Sequences, rows: list[int], pad_id: int = 0) -> Sequences:
    """Row i's prompt followed by row `rows[i]`'s completion (and whatever follows it), right padded.

    sequences: [B, T] right-padded rows; a row's prompt is its real tokens before the first
    completion token. Returns new `Sequences` [B, T'] with the completion mask on the moved answers.
    """
    ids, attention, completion = sequences.input_ids.tolist(), sequences.attention_mask.tolist(), sequences.completion_mask.tolist()

    def split(row: int) -> tuple[list[int], list[tuple[int, int]]]:
        length = sum(attention[row])
        start = completion[row].index(1) if 1 in completion[row][:length] else length
        return ids[row][:start], list(zip(ids[row][start:length], completion[row][start:length]))

    parts = [split(row) for row in range(len(ids))]
    new_rows = [(parts[i][0], parts[j][1]) for i, j in enumerate(rows)]
    width = max(len(prompt) + len(answer) for prompt, answer in new_rows)
    out_ids, out_attention, out_completion = [], [], []
    for prompt, answer in new_rows:
        pad = width - len(prompt) - len(answer)
        out_ids.append(prompt + [token for token, _ in answer] + [pad_id] * pad)
        out_attention.append([1] * (len(prompt) + len(answer)) + [0] * pad)
        out_completion.append([0] * len(prompt) + [flag for _, flag in answer] + [0] * pad)
    device = sequences.input_ids.device
    return Sequences(
        torch.tensor(out_ids, dtype=sequences.input_ids.dtype, device=device),
        torch.tensor(out_attention, dtype=sequences.attention_mask.dtype, device=device),
        torch.tensor(out_completion, dtype=sequences.completion_mask.dtype, device=device),
    )


class KTO(MovesReference, Objective):
    """KTO on answers labelled desirable or undesirable, unpaired (Ethayarajh et al. 2024; TRL's KTOTrainer).

    Reads `--dataset FILE` with the `labeled` builder (prompt/completion/label rows; a
    prompt/chosen/rejected row is one desirable and one undesirable answer).

    Options (TRL's `KTOConfig` names):
        beta: scale of the implicit reward (default 0.1).
        desirable_weight, undesirable_weight: weights of the two kinds of answer (1.0 each); with
            unequal counts the paper advises desirable_weight x #desirable ~ undesirable_weight x #undesirable.
        loss_type: "kto" (default) or "apo_zero_unpaired" (no KL point, no mismatched rows).
        sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps: TR-DPO's moving reference, as for dpo (off; 0.6, 512).
    The KL point is estimated on each batch's prompts paired with the previous row's answer
    (with several processes, averaged over their batches, as TRL does);
    the reference must score those rows too, so "kto" keeps a frozen reference model
    (`--reference auto` chooses it) instead of cached log-probs.
    """

    needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=SETS, dataset_builder="labeled", scores_new_rows=True)

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
                 sync_ref_model: bool = False, ref_model_mixup_alpha: float = 0.6, ref_model_sync_steps: int = 512,
                 processes: Processes | None = None):
        check_options(beta, desirable_weight, undesirable_weight, loss_type)
        self.processes = processes or Processes()
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        if loss_type != "kto":  # no mismatched rows: the dataset's cached log-probs serve
            self.needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=SETS, dataset_builder="labeled")
        if sync_ref_model:  # a reference that moves: a frozen model
            self.moving = SyncReference(ref_model_mixup_alpha, ref_model_sync_steps)
            self.needs = replace(self.needs, reference=REFERENCE_DISTRIBUTIONS, moves_reference=True)

    def loss(self, policy: Policy, reference: Reference | None, batch: LabeledBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean KTO loss over the batch's answers, with TRL's metrics (kl, rewards/..., logps/...)."""
        if reference is None:
            raise PrefError("kto compares the policy with a reference: do not pass --reference none")
        sequences, labels = batch.sequences, batch.labels.bool()
        calculate_kl = self.loss_type == "kto"
        if calculate_kl and isinstance(reference, CachedReference):
            raise PrefError("kto's KL point scores mismatched prompt/answer rows that a reference cache does not hold: use --reference model (or auto)")
        if calculate_kl and len(labels) < 2:
            raise PrefError("kto estimates its KL point from the other rows of a batch: use --batch-size 2 or more")
        policy_out = policy.logps(sequences)
        logps = policy_out.sequence
        labels = labels.to(logps.device)
        with torch.no_grad():
            reference_logps = reference.logps(sequences).sequence.to(logps.device)
            policy_kl_logps = reference_kl_logps = None
            if calculate_kl:
                pad_id = policy.tokenizer.pad_token_id
                mismatched = swap_completions(sequences, mismatched_rows(len(labels)), 0 if pad_id is None else pad_id)
                policy_kl_logps = policy.logps(mismatched).sequence
                reference_kl_logps = reference.logps(mismatched).sequence.to(logps.device)
        losses, chosen_rewards, rejected_rewards, kl = kto_loss(
            logps[labels], logps[~labels], reference_logps[labels], reference_logps[~labels],
            policy_kl_logps, reference_kl_logps,
            beta=self.beta, desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight, loss_type=self.loss_type,
            processes=self.processes,
        )
        metrics = {"kl": kl.item()}
        if labels.any():
            metrics["rewards/chosen"] = chosen_rewards.mean().item()
            metrics["logps/chosen"] = logps[labels].detach().mean().item()
        if (~labels).any():
            metrics["rewards/rejected"] = rejected_rewards.mean().item()
            metrics["logps/rejected"] = logps[~labels].detach().mean().item()
        if labels.any() and (~labels).any():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return losses.mean(), metrics


@hookimpl
def register_objectives(register):
    register("kto", KTO)
