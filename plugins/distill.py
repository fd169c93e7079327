"""Distillation: the policy samples answers, and learns a teacher's next-token distribution at every token it sampled.

This is TRL 1.16's `DistillationTrainer` (on-policy distillation, Agarwal et al. 2024,
https://arxiv.org/abs/2306.13649). The teacher is the run's reference, `--reference-model TEACHER`, a model
of the policy's vocabulary (a larger one of its family). At each completion token the loss is the
generalized Jensen-Shannon divergence between the policy's and the teacher's distributions, both at
`temperature`: `beta` 0 is the forward KL(teacher || policy), 1 (TRL's default) the reverse
KL(policy || teacher), in between the JSD with mixture `(1 - beta) p_policy + beta p_teacher`. Every
token of the batch counts alike (the sum over them divided by their number, across micro-batches and
processes). No reward is needed; a `--reward` given is logged (`reward/mean`), not trained on.

With `distillation_objective` "iw_opd" the loss is instead IW-OPD's (Xie et al. 2026, "On the Position Bias of On-Policy
Distillation", https://arxiv.org/abs/2606.22600; TRL 1.16's `trl.experimental.iw_opd`): a policy gradient on each sampled token
with the advantage log p_teacher - log p_policy, weighted down along the answer as the two models' disagreement accumulates
(`iw_opd_weights`).

Neither model's [B, T, V] logits are held: both models give their last hidden states, and the
divergence runs through their output layers a few rows at a time, each chunk recomputed in the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import REFERENCE_DISTRIBUTIONS, SAMPLES, Minibatch, Objective, ObjectiveNeeds, Policy, Reference
from pref.plugins.grpo import completion_metrics
from pref.sequences import LOGIT_CHUNK_ELEMENTS, OutputHead


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """The divergence between two next-token distributions given as logits [N, V], per row: [N] (grad to the student only).

    beta 0: KL(teacher || student); beta 1: KL(student || teacher); else beta KL(teacher || m) + (1 - beta) KL(student || m),
    m = (1 - beta) p_student + beta p_teacher. Both logits are divided by `temperature` first.
    """
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    return beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)


def over_chunks(figures: Callable[..., torch.Tensor], student_hidden: torch.Tensor, student_head: OutputHead, teacher_hidden: torch.Tensor | None,
                teacher_head: OutputHead | None, *per_row: torch.Tensor, trim: bool = True) -> torch.Tensor:
    """`figures(student_logits, teacher_logits, *per_row)` -> [F, n] over N positions given the two models' last hidden states
    [N, H_s] and [N, H_t] (and `per_row` tensors [N, ...], such as the sampled tokens): [F, N], grad to the student only.
    Without a teacher (`teacher_hidden` None), `figures(student_logits, *per_row)`.

    The heads run on `LOGIT_CHUNK_ELEMENTS // V` rows at a time (V the wider head's); with grad and several chunks each is recomputed
    in the backward, so a step holds one chunk's logits, not [N, V]. Heads of different widths (a teacher with more padding rows, same
    tokenizer) are compared on the rows both have, unless `trim` is False (another tokenizer's teacher: `figures` gets both whole). With no position, the [F, 0] result is still joined to the student's graph, so that
    backward (and DDP's) runs.
    """
    widths = [head.module.weight.shape[0] for head in (student_head, teacher_head) if head is not None]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // max(*widths, 1))

    def part(h_s: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        student = student_head.logits(h_s)
        if teacher_head is None:
            return figures(student, *rest)
        with torch.no_grad():
            teacher = teacher_head.logits(rest[0])
        width = min(student.shape[-1], teacher.shape[-1]) if trim else None
        return figures(student[:, :width], teacher[:, :width], *rest[1:])

    inputs = [student_hidden, *([] if teacher_hidden is None else [teacher_hidden]), *per_row]
    if not student_hidden.shape[0]:
        return part(*(t.new_zeros((1, *t.shape[1:])) for t in inputs))[:, :0]
    # one chunk is kept for the backward: recomputing it would cost its time and, as it is alive at the backward's start
    # either way, save no peak memory
    recompute = torch.is_grad_enabled() and student_hidden.shape[0] > chunk
    return torch.cat([checkpoint(part, *(t[i : i + chunk] for t in inputs), use_reentrant=False) if recompute
                      else part(*(t[i : i + chunk] for t in inputs))
                      for i in range(0, student_hidden.shape[0], chunk)], dim=-1)


def chunked_divergence(student_hidden: torch.Tensor, student_head: OutputHead, teacher_hidden: torch.Tensor, teacher_head: OutputHead,
                       beta: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`generalized_jsd` at N positions given the two models' last hidden states [N, H_s] and [N, H_t], and the student's entropy
    there (at `temperature`, no grad): [N] each, a few rows at a time (`over_chunks`)."""

    def figures(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(student.detach() / temperature, dim=-1)
        return torch.stack([generalized_jsd(student, teacher, beta, temperature), -(log_p.exp() * log_p).sum(-1)])

    divergence, entropy = over_chunks(figures, student_hidden, student_head, teacher_hidden, teacher_head)
    return divergence, entropy.detach()


def iw_opd_weights(advantages: torch.Tensor, gamma: float, epsilon: float = 1e-8) -> torch.Tensor:
    """IW-OPD's weight of each token [B, T] from the advantages [B, T] (0 off the answer): 1 + gamma x the share of its row's
    total |advantage| not yet spent before it, from 1 + gamma at the first token down towards 1 (TRL's `_compute_iw_opd_loss`)."""
    spent = advantages.abs().cumsum(dim=1) - advantages.abs()
    total = advantages.abs().sum(dim=1, keepdim=True).clamp_min(epsilon)
    return 1.0 + gamma * (1.0 - spent / total)


def sampled_token_figures(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """[3, N]: at N positions, the policy's log-prob of the sampled token (with grad), the teacher's (without), and the policy's
    entropy (without), all at `temperature`."""
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    picked = [torch.gather(log_p, -1, targets[:, None]).squeeze(-1) for log_p in (log_s, log_t)]
    return torch.stack([picked[0], picked[1].detach(), -(log_s.detach().exp() * log_s.detach()).sum(-1)])


class Distill(Objective):
    """On-policy distillation from `--reference-model TEACHER` (TRL's `DistillationTrainer`).

    Options (`-o KEY=VALUE`):
        distillation_objective: "jsd" (default: TRL's DistillationTrainer) or "iw_opd" (TRL's experimental IWOPDTrainer).
        beta: the jsd's: 0 forward KL(teacher || policy), 1 reverse KL(policy || teacher) (default, as TRL's), in between the
            generalized JSD.
        iw_opd_gamma, iw_opd_epsilon: iw_opd's weight amplification (0.5) and the floor of a row's total |advantage| (1e-8).
        lmbda: the share of steps that sample from the policy (1.0: all, on-policy, as TRL's DistillationTrainer); the others train
            on the rows' own answers, their `answer_column` ("completion": TRL's prompt-completion rows; a `messages` row's last
            answer), as GKD's (Agarwal et al. 2024; TRL's experimental GKDTrainer, lmbda 0.5 there).
        temperature: the distributions are compared at this temperature (default: the one the answers were sampled at,
            `--temperature`, as TRL's).
    """

    def __init__(self, beta: float | None = None, temperature: float | None = None, distillation_objective: str = "jsd",
                 iw_opd_gamma: float = 0.5, iw_opd_epsilon: float = 1e-8, lmbda: float = 1.0, answer_column: str = "completion",
                 reference_model: str | None = None):
        if not 0.0 <= lmbda <= 1.0:
            raise PrefError(f"distill: lmbda, the share of steps that sample from the policy, must lie in [0, 1], got {lmbda}")
        if distillation_objective not in ("jsd", "iw_opd"):
            raise PrefError(f"distill: distillation_objective must be jsd or iw_opd, not {distillation_objective!r}")
        if distillation_objective == "iw_opd" and beta is not None:
            raise PrefError("distill: beta is the jsd's; iw_opd trains on the sampled tokens' log-probs alone: drop beta")
        if iw_opd_gamma < 0 or not iw_opd_epsilon > 0:
            raise PrefError(f"distill: iw_opd_gamma must be 0 or more and iw_opd_epsilon above 0, got {iw_opd_gamma} and {iw_opd_epsilon}")
        beta = 1.0 if beta is None else beta
        if not 0.0 <= beta <= 1.0:
            raise PrefError(f"distill: beta must lie in [0, 1] (0 forward KL, 1 reverse KL), got {beta}")
        if temperature is not None and not temperature > 0:
            raise PrefError(f"distill: temperature must be above 0, got {temperature}")
        if not reference_model:
            raise PrefError("distill learns a teacher's distributions: pass --reference-model TEACHER (a hub id or folder of a model "
                            "with the policy's tokenizer, usually a larger one of its family)")
        self.beta, self.temperature, self.iw_opd = beta, temperature, distillation_objective == "iw_opd"
        self.gamma, self.epsilon = iw_opd_gamma, iw_opd_epsilon
        self.needs = ObjectiveNeeds(
            reference=REFERENCE_DISTRIBUTIONS,  # the teacher, a frozen model
            data=SAMPLES,
            online=True,
            scored=False,  # a --reward is only logged
            dataset_builder="prompts",
            columns=(answer_column,) if lmbda < 1.0 else (),
            on_policy_fraction=lmbda,
            off_policy_answers=answer_column if lmbda < 1.0 else None,
            dropout=True,  # as TRL's DistillationTrainer (disable_dropout False)
        )

    def loss_items(self, batch: Minibatch) -> int:
        """The completion tokens the loss averages over (after each row's first position)."""
        return int(batch.rollout.batch.sequences.completion_mask[batch.rows, 1:].sum())

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean divergence (or IW-OPD's per-token loss) over this step's completion tokens; metric `entropy`, the policy's mean
        token entropy (nats), as TRL's, iw_opd's `iw_opd/*`, and TRL's `completions/*` of the step's samples."""
        if reference is None:
            raise PrefError("distill compares the policy with its teacher, the reference: do not pass --reference none")
        samples = batch.prepared(self, policy, reference)
        sequences, temperature = samples.sequences, self.temperature or samples.temperature
        student = policy.hidden_states(sequences)
        teacher = reference.hidden_states(sequences).to(student.device)
        where = sequences.completion_mask.to(student.device).bool()
        where[:, 0] = False  # token t is predicted at position t - 1: the first has no prefix
        if self.iw_opd:
            loss, metrics = self.iw_opd_loss(student, teacher, where, sequences.input_ids.to(student.device), policy, reference, temperature)
            return loss, {**metrics, **completion_metrics(samples)}
        divergence, entropy = chunked_divergence(student[:, :-1][where[:, 1:]], policy.output_head(), teacher[:, :-1][where[:, 1:]],
                                                 reference.output_head(), self.beta, temperature)
        count = max(divergence.numel(), 1)
        return divergence.sum() / count, {"entropy": entropy.sum().item() / count, **completion_metrics(samples)}


    def iw_opd_loss(self, student: torch.Tensor, teacher: torch.Tensor, where: torch.Tensor, ids: torch.Tensor, policy: Policy,
                    reference: Reference, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        """-sum(weight x advantage x log p_policy(token)) / tokens, the advantage log p_teacher - log p_policy without grad."""
        mine, teachers, entropy = over_chunks(lambda s, t, y: sampled_token_figures(s, t, y, temperature), student[:, :-1][where[:, 1:]],
                                              policy.output_head(), teacher[:, :-1][where[:, 1:]], reference.output_head(), ids[where])
        advantages = torch.zeros(where.shape, device=student.device).masked_scatter(where, teachers - mine.detach())
        weights = iw_opd_weights(advantages, self.gamma, self.epsilon)[where]
        advantages = advantages[where]
        count = max(mine.numel(), 1)
        metrics = {"entropy": entropy.sum().item() / count}
        if mine.numel():  # TRL's names
            metrics.update({"iw_opd/mean_advantage": (weights * advantages).mean().item(),
                            "iw_opd/mean_abs_advantage": advantages.abs().mean().item(), "iw_opd/mean_weight": weights.mean().item(),
                            "iw_opd/min_weight": weights.min().item(), "iw_opd/max_weight": weights.max().item()})
        return -(mine * weights * advantages).sum() / count, metrics


@hookimpl
def register_objectives(register):
    register("distill", Distill)
