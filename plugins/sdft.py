"""SDFT, self-distillation fine-tuning: the policy samples answers to the prompts alone, and at every token it sampled learns the
next-token distribution of a teacher that also sees a demonstration.

This is TRL 1.16's `trl.experimental.sdft.SDFTTrainer` (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning",
https://arxiv.org/abs/2601.19897). Each row of `--dataset` gives a prompt and its `privileged_context` (a demonstration, a
worked answer: text, or chat messages whose texts are joined by newlines). The teacher reads the prompt with that context in
it (`teacher_prompt_template`; for a chat prompt, in its last user turn) followed by the student's sampled answer, so both
models predict the same answer tokens, the teacher knowing what the student does not.

The teacher (`teacher_model_kind`) is the starting policy (`base`, the frozen reference: with `--lora`, the model with its
adapter off; `--reference-model` gives another model of the same vocabulary), an average of the policy's weights that follows
it (`ema`: every `teacher_sync_steps` steps, teacher <- rate * policy + (1 - rate) * teacher), or the policy itself, without
grad (`live`). The per-token loss (`distillation_mode`) is the generalized JSD (`distillation_alpha`: 0 forward KL, 1 reverse
KL) on the student's top-k tokens (`topk_logits`, the default), on the whole vocabulary (`full_logits`), or the reverse KL's
estimate at the sampled token (`sampled_token`). Each answer's loss is the mean over its tokens, the batch's the mean over its
answers, as TRL's. Neither model's [B, T, V] logits are held: the heads run a few positions at a time (`over_chunks`).

Not offered: TRL's `generate_from_teacher` (sampling from the teacher's prompt), its vLLM teacher server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import (
    NO_REFERENCE, REFERENCE_DISTRIBUTIONS, SAMPLES, Minibatch, Objective, ObjectiveNeeds, Policy, Reference, ScoredBatch,
)
from pref.plugins.distill import generalized_jsd, over_chunks
from pref.plugins.grpo import completion_metrics
from pref.plugins.moving_reference import MovesReference, SyncReference
from pref.sequences import OutputHead, Sequences

MODES = ("topk_logits", "full_logits", "sampled_token")
TEACHERS = ("base", "ema", "live")


def context_text(context: Any) -> str:
    """A row's privileged context as text: a string itself, chat messages their texts joined by newlines, anything else str()."""
    if isinstance(context, str):
        return context
    if isinstance(context, list) and context and isinstance(context[0], dict):
        return "\n".join(text for message in context if (text := message_text(message)))
    return str(context)


def message_text(message: dict) -> str:
    """A chat message's text (the text parts of a multimodal content list, joined by spaces)."""
    content = message.get("content", "")
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return str(content)


def teacher_prompt(prompt: Prompt, context: Any, template: str) -> Prompt:
    """The teacher's prompt: `template` filled with the prompt and the context; a chat prompt keeps its earlier turns, and its
    last turn, the user's, becomes the filled template (as TRL's `DemonstrationTeacherContextBuilder`)."""
    if context is None:
        raise PrefError("sdft: a row's privileged context is empty (null); give each prompt a demonstration to learn from")
    if isinstance(prompt, list):
        if not prompt or prompt[-1].get("role") != "user":
            raise PrefError("sdft: a chat prompt must end with the user's turn, where the teacher's context goes; "
                            f"this one ends with {prompt[-1].get('role') if prompt else 'nothing'!r}")
        return [*prompt[:-1], {"role": "user", "content": template.format(prompt=message_text(prompt[-1]), privileged_context=context_text(context))}]
    return template.format(prompt=prompt, privileged_context=context_text(context))


def check_distillation(objective: str, mode: str, alpha: float, is_clip: float | None, teacher: str, update_rate: float,
                       sync_steps: int) -> None:
    """The options SDFT and SDPO share (`distillation_mode`, `distillation_alpha`, `distillation_is_clip`, `teacher_model_kind`,
    `teacher_update_rate`, `teacher_sync_steps`), each mistake a one-line error."""
    if mode not in MODES:
        raise PrefError(f"{objective}: distillation_mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not 0.0 <= alpha <= 1.0:
        raise PrefError(f"{objective}: distillation_alpha must lie in [0, 1] (0 forward KL, 1 reverse KL), got {alpha}")
    if mode == "sampled_token" and alpha != 1.0:
        raise PrefError(f"{objective}: distillation_mode sampled_token estimates the reverse KL only: set distillation_alpha=1, or use "
                        "topk_logits or full_logits")
    if is_clip is not None and not is_clip > 0:
        raise PrefError(f"{objective}: distillation_is_clip must be above 0 (or null: off), got {is_clip}")
    if teacher not in TEACHERS:
        raise PrefError(f"{objective}: teacher_model_kind must be one of {', '.join(TEACHERS)}, not {teacher!r}")
    if not 0.0 < update_rate <= 1.0 or sync_steps < 1:
        raise PrefError(f"{objective}: teacher_update_rate must lie in (0, 1] and teacher_sync_steps be at least 1, got {update_rate} "
                        f"and {sync_steps}")


def check_template(objective: str, option: str, template: str, fields: tuple[str, ...], required: tuple[str, ...] | None = None) -> None:
    """A one-line error unless `template` is a `str.format` template of (some of) `fields` holding each of `required` (all by default)."""
    names = " and ".join(f"{{{name}}}" for name in fields)
    try:
        filled = template.format(**{name: f"\0{i}" for i, name in enumerate(fields)})
    except (KeyError, IndexError, ValueError) as exc:
        raise PrefError(f"{objective}: {option} {template!r} is not a template of {names} ({exc!r}); write other braces doubled, "
                        "{{ and }}") from None
    missing = [name for name in (fields if required is None else required) if f"\0{fields.index(name)}" not in filled]
    if missing:
        raise PrefError(f"{objective}: {option} {template!r} must hold {' and '.join(f'{{{name}}}' for name in missing)}")


def topk_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, alpha: float, add_tail: bool) -> torch.Tensor:
    """`generalized_jsd` [N] on the student's top-k tokens of each row of logits [N, V]: both distributions restricted to those
    tokens and renormalised, or with `add_tail` one more bucket holding the rest of each one's mass (grad to the student only)."""
    top, index = torch.topk(student_logits, k=min(k, student_logits.shape[-1]), dim=-1)
    student = top - torch.logsumexp(student_logits, dim=-1, keepdim=True)
    teacher = torch.gather(teacher_logits, -1, index) - torch.logsumexp(teacher_logits, dim=-1, keepdim=True)
    if add_tail:  # log(1 - captured mass), the captured mass kept just below 1
        student, teacher = (torch.cat([lp, torch.log(-torch.expm1(torch.logsumexp(lp, -1, keepdim=True).clamp(max=-1e-7)))], dim=-1)
                            for lp in (student, teacher))
    return generalized_jsd(student, teacher, alpha)  # its log-softmax renormalises the restricted ones, and leaves the tailed ones be


def token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, mode: str, alpha: float, k: int,
                 add_tail: bool, temperature: float) -> torch.Tensor:
    """At N positions, the per-token loss of `mode` and the student's log-prob of the sampled token (`targets` [N]): [2, N], both at
    `temperature`, grad to the student in the first only. `sampled_token` (reverse KL only) is the estimate
    (log p_s(y) - log p_t(y)) * log p_s(y), its first factor without grad."""
    student, teacher = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    sampled = (torch.gather(student, -1, targets[:, None]) - torch.logsumexp(student, -1, keepdim=True)).squeeze(-1)
    if mode == "topk_logits":
        loss = topk_divergence(student, teacher, k, alpha, add_tail)
    elif mode == "full_logits":
        loss = generalized_jsd(student, teacher, alpha)
    else:
        teacher_sampled = (torch.gather(teacher, -1, targets[:, None]) - torch.logsumexp(teacher, -1, keepdim=True)).squeeze(-1)
        loss = (sampled - teacher_sampled).detach() * sampled
    return torch.stack([loss, sampled.detach()])


def sampled_logps(hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N] the log-probs at `temperature` of the tokens `targets` [N] from the last hidden states [N, H] that predict them, a few
    rows of logits at a time (`over_chunks`), with grad when it is on."""

    def picked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature
        return (torch.gather(logits, -1, targets[:, None]) - torch.logsumexp(logits, -1, keepdim=True)).T

    return over_chunks(picked, hidden, head, None, None, targets)[0]


def token_logps(policy: Policy, sequences: Sequences, temperature: float) -> torch.Tensor:
    """[B, T] each completion token's log-prob under the policy at `temperature` (0 elsewhere and at position 0), as the loss
    computes it: the log-probs of the policy that sampled a rollout trained on more than once."""
    hidden = policy.hidden_states(sequences)
    where = sequences.completion_mask.to(hidden.device).bool()
    where[:, 0] = False  # token t is predicted at position t - 1
    logps = sampled_logps(hidden[:, :-1][where[:, 1:]], policy.output_head(), sequences.input_ids.to(hidden.device)[where], temperature)
    return torch.zeros(where.shape, device=hidden.device).masked_scatter(where, logps.float())


def teacher_sequences(policy: Policy, prompts: list[Prompt], sampled: Sequences, max_prompt_length: int | None = None) -> Sequences:
    """The teacher's rows: each of its `prompts` encoded as the policy encodes prompts (cut to its last `max_prompt_length` tokens;
    None: the run's `--max-prompt-length`, as TRL's SDFT), then the very answer tokens of the matching row of `sampled`."""
    encoded = policy.encode(prompts, [""] * len(prompts), max_prompt_length)
    rows = []
    for ids, real, answer_mask, answer_ids, answer in zip(encoded.input_ids, encoded.attention_mask, encoded.completion_mask,
                                                           sampled.input_ids.cpu(), sampled.completion_mask.cpu()):
        prompt = ids[(real == 1) & (answer_mask == 0)]
        answer_ids = answer_ids[answer == 1]
        rows.append(Sequences(torch.cat([prompt, answer_ids])[None], torch.ones(1, len(prompt) + len(answer_ids), dtype=torch.long),
                              torch.cat([torch.zeros(len(prompt), dtype=torch.long), torch.ones(len(answer_ids), dtype=torch.long)])[None]))
    return Sequences.concat(rows, pad_id=policy.tokenizer.pad_token_id or 0)


def loss_tokens(completion_mask: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the completion tokens the loss counts, those of each row from its answer's token `first[row]` (from 0) on."""
    return completion_mask.bool() & (completion_mask.long().cumsum(-1) - 1 >= first[:, None])


@dataclass
class TeacherRows:
    """A rollout prepared for SDFT: the samples, the teacher's rows (its prompt, then each sample's very answer tokens), and
    the student's token log-probs as sampled (`token_logps` [B, T], when the rollout is trained on more than once)."""

    samples: ScoredBatch
    teacher: Sequences
    old_logps: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "TeacherRows":
        return TeacherRows(self.samples.select(rows), self.teacher.select(rows), None if self.old_logps is None else self.old_logps[rows])


class SDFT(MovesReference, Objective):
    """SDFT (TRL's experimental `SDFTTrainer`): learn, on one's own samples, the distributions of a teacher shown a demonstration.

    Options (`-o KEY=VALUE`, TRL's `SDFTConfig` names and defaults):
        distillation_mode: "topk_logits" (default), "full_logits" or "sampled_token" (reverse KL at the sampled tokens).
        distillation_alpha: 0 forward KL(teacher || policy), 1 reverse KL, in between the generalized JSD (0.5).
        distillation_topk: the student's likeliest tokens the topk_logits mode compares (100).
        distillation_add_tail: topk_logits keeps the rest of each distribution's mass as one more bucket (off: renormalised).
        distillation_is_clip: when a rollout is trained on more than once, each token's loss is weighted by its ratio
            p_now / p_sampled, clipped above at this (2.0; null: off).
        num_loss_tokens_to_skip: each answer's first tokens left out of the loss (0).
        teacher_model_kind: "base" (default: the starting policy, the frozen reference), "ema" or "live" (the policy itself).
        teacher_update_rate, teacher_sync_steps: ema's teacher <- rate * policy + (1 - rate) * teacher every that many steps (0.05, 1).
        teacher_prompt_template: the teacher's prompt ("{prompt}\\n\\n{privileged_context}").
        context_column: the row column holding the demonstration ("privileged_context", TRL's).
        temperature: both models' logits are compared at it (default: the one the answers were sampled at, `--temperature`, as TRL's).
        num_iterations, steps_per_generation: passes over each rollout, and optimizer steps per pass (1, 1).
    """

    def __init__(self, distillation_mode: str = "topk_logits", distillation_alpha: float = 0.5, distillation_topk: int = 100,
                 distillation_add_tail: bool = False, distillation_is_clip: float | None = 2.0, num_loss_tokens_to_skip: int = 0,
                 teacher_model_kind: str = "base", teacher_update_rate: float = 0.05, teacher_sync_steps: int = 1,
                 teacher_prompt_template: str = "{prompt}\n\n{privileged_context}", context_column: str = "privileged_context",
                 temperature: float | None = None, num_iterations: int = 1, steps_per_generation: int = 1):
        check_distillation("sdft", distillation_mode, distillation_alpha, distillation_is_clip, teacher_model_kind, teacher_update_rate,
                           teacher_sync_steps)
        if distillation_topk < 1:
            raise PrefError(f"sdft: distillation_topk must be at least 1, got {distillation_topk}")
        if num_loss_tokens_to_skip < 0:
            raise PrefError(f"sdft: num_loss_tokens_to_skip must not be negative, got {num_loss_tokens_to_skip}")
        check_template("sdft", "teacher_prompt_template", teacher_prompt_template, ("prompt", "privileged_context"))
        if temperature is not None and not temperature > 0:
            raise PrefError(f"sdft: temperature must be above 0, got {temperature}")
        for name, value in (("num_iterations", num_iterations), ("steps_per_generation", steps_per_generation)):
            if value < 1:
                raise PrefError(f"sdft: {name} must be at least 1, got {value}")
        self.mode, self.alpha, self.topk, self.add_tail = distillation_mode, distillation_alpha, distillation_topk, distillation_add_tail
        self.is_clip, self.skip, self.kind = distillation_is_clip, num_loss_tokens_to_skip, teacher_model_kind
        self.template, self.column, self.temperature = teacher_prompt_template, context_column, temperature
        self.moving = SyncReference(teacher_update_rate, teacher_sync_steps) if teacher_model_kind == "ema" else None
        self.needs = ObjectiveNeeds(
            reference=NO_REFERENCE if teacher_model_kind == "live" else REFERENCE_DISTRIBUTIONS,
            data=SAMPLES,
            online=True,
            samples_per_prompt=8,  # TRL's num_generations
            scored=False,  # a --reward is only logged
            columns=(context_column,),
            epochs_per_rollout=num_iterations,
            minibatches_per_rollout=steps_per_generation,
            dataset_builder="prompts",
            moves_reference=teacher_model_kind == "ema",
        )

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> TeacherRows:
        """The teacher's rows, once per rollout: its prompt encoded as the policy encodes prompts, then the sampled answer's tokens."""
        prompts = [teacher_prompt(prompt, context, self.template) for prompt, context in zip(batch.prompts, batch.columns[self.column])]
        reused = self.needs.epochs_per_rollout * self.needs.minibatches_per_rollout > 1
        temperature = self.temperature or batch.temperature
        old_logps = token_logps(policy, batch.sequences, temperature) if reused and self.is_clip is not None else None
        return TeacherRows(batch, teacher_sequences(policy, prompts, batch.sequences), old_logps)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean over answers of each one's mean per-token loss; metrics TRL's `self_distillation/distillation_loss`, the mean over
        all their tokens, and `completions/*`."""
        if reference is None and self.kind != "live":
            raise PrefError("sdft's teacher is the reference: do not pass --reference none (or use -o teacher_model_kind=live)")
        rows = batch.prepared(self, policy, reference)
        sequences = rows.samples.sequences
        student = policy.hidden_states(sequences)
        device = student.device
        with torch.no_grad():
            teacher = (policy if self.kind == "live" else reference).hidden_states(rows.teacher).to(device)
        # the same answer tokens in both models' rows: from the answer's `num_loss_tokens_to_skip`-th on (and after the first, where
        # the student's answer starts at position 0, which no position predicts); position t predicts token t + 1
        first = sequences.completion_mask[:, 0].long().clamp(min=self.skip).to(device)
        mine = loss_tokens(sequences.completion_mask.to(device), first)[:, 1:]
        theirs = loss_tokens(rows.teacher.completion_mask.to(device), first)[:, 1:]
        if int(mine.sum()) != int(theirs.sum()):
            raise PrefError("sdft: the teacher's rows hold other answer tokens than the student's; this is a bug in pref, please report it")
        head = policy.output_head()
        losses, sampled = over_chunks(
            lambda s, t, y: token_losses(s, t, y, self.mode, self.alpha, self.topk, self.add_tail, self.temperature or rows.samples.temperature),
            student[:, :-1][mine], head, teacher[:, :-1][theirs], head if self.kind == "live" else reference.output_head(),
            sequences.input_ids.to(device)[:, 1:][mine])
        if rows.old_logps is not None:  # the ratio of the policy now to the one that sampled, clipped above, without grad
            old = rows.old_logps.to(device)[:, 1:][mine]
            losses = losses * torch.exp((sampled - old).clamp(-20.0, 20.0)).clamp(max=self.is_clip)
        answer = mine.nonzero()[:, 0]
        per_answer = torch.zeros(len(sequences), device=device, dtype=losses.dtype).index_add(0, answer, losses)
        counts = mine.sum(-1).clamp(min=1)
        count = max(losses.numel(), 1)
        return (per_answer / counts).mean(), {"self_distillation/distillation_loss": losses.detach().sum().item() / count,
                                              **completion_metrics(rows.samples)}


@hookimpl
def register_objectives(register):
    register("sdft", SDFT)
