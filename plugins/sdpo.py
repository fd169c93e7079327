"""SDPO, self-distillation policy optimisation: GRPO's samples and rewards, and a teacher that is the model itself shown a
sibling's successful answer (or the environment's feedback), whose next-token distributions the policy learns.

This is TRL 1.16's `trl.experimental.sdpo.SDPOTrainer` (Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation",
https://arxiv.org/abs/2601.20802). Each prompt gets K samples, scored by the reward. A sample whose group holds another one that
reached `success_reward_threshold` is re-prompted for the teacher: the prompt, then that answer as a worked solution
(`reprompt_template`, `solution_template`; for a chat prompt in its last user turn), then the sample's own answer tokens. The
teacher (the starting policy, an average of the policy's weights, or the policy itself, as SDFT's: `pref.plugins.sdft`) knows a
good answer the student did not see, and the student learns its distribution at every token of its own answer, with SDFT's
losses. `distillation_weight` below 1 mixes in GRPO's clipped policy-gradient loss on the group-relative advantages.
Samples without a teacher count 0 in the distillation term's mean over samples, as TRL's.

Not offered: TRL's vLLM teacher server; its `beta`, which its loss never reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import (
    NO_REFERENCE, REFERENCE_DISTRIBUTIONS, SAMPLES, Minibatch, Objective, ObjectiveNeeds, Policy, Processes, Reference, ScoredBatch,
)
from pref.plugins.distill import over_chunks
from pref.plugins.grpo import (
    SCALE_REWARDS, check_options, group_advantages, group_size, grpo_loss, loss_metrics, rollout_metrics, truncated_of, without_truncated,
)
from pref.plugins.moving_reference import MovesReference, SyncReference
from pref.plugins.sdft import check_distillation, check_template, loss_tokens, message_text, sampled_logps, teacher_sequences, token_logps, token_losses
from pref.sequences import OutputHead, Sequences

POLICY_LOSSES = ("dapo", "grpo", "bnpo", "dr_grpo")
REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
SOLUTION = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"


@dataclass(frozen=True)
class Reprompting:
    """Which samples get a teacher, and its prompt (TRL's `SuccessfulRolloutTeacherContextBuilder`)."""

    threshold: float = 1.0
    use_successful: bool = True
    not_own_success: bool = True
    include_feedback: bool = False
    feedback_only_without_solution: bool = False
    remove_thinking: bool = False
    reprompt_template: str = REPROMPT
    solution_template: str = SOLUTION
    feedback_template: str = FEEDBACK

    def teacher_prompts(self, prompts: list[Prompt], completions: list[str], rewards: list[float], feedback: list[Any] | None,
                        k: int) -> tuple[list[Prompt | None], dict[str, float]]:
        """Each sample's teacher prompt (None: no teacher) and TRL's `self_distillation/*` fractions, for B samples in groups of K.

        A sample's solution is the first other sample of its group (itself too, unless `not_own_success`) whose reward reaches the
        threshold; its feedback is its row's feedback when `include_feedback` and it is a non-empty text (and, with
        `feedback_only_without_solution`, only when there is no solution)."""
        active: list[Prompt | None] = []
        with_solution = feedback_available = feedback_used = 0
        successful_groups = sum(any(r >= self.threshold for r in rewards[g : g + k]) for g in range(0, len(rewards), k))
        for i, prompt in enumerate(prompts):
            start = i - i % k
            demos = [j for j in range(start, start + k) if self.use_successful and rewards[j] >= self.threshold
                     and not (self.not_own_success and j == i)]
            raw = feedback[i] if feedback is not None else None
            has_feedback = isinstance(raw, str) and raw.strip() != ""
            use_feedback = self.include_feedback and has_feedback and not (self.feedback_only_without_solution and demos)
            with_solution, feedback_available, feedback_used = with_solution + bool(demos), feedback_available + has_feedback, \
                feedback_used + use_feedback
            if not demos and not use_feedback:
                active.append(None)
                continue
            solution = ""
            if demos:
                demo = completions[demos[0]]
                if self.remove_thinking:
                    demo = re.sub(r"<think>.*?</think>", "", demo, flags=re.DOTALL).strip()
                solution = self.solution_template.format(successful_previous_attempt=demo)
            said = self.feedback_template.format(feedback_raw=raw) if use_feedback else ""
            active.append(self.reprompt(prompt, solution, said))
        count = max(len(prompts), 1)
        metrics = {
            "self_distillation/success_group_fraction": successful_groups / max(len(prompts) // k, 1),
            "self_distillation/success_sample_fraction": with_solution / count,
            "self_distillation/feedback_available_fraction": feedback_available / count,
            "self_distillation/feedback_used_fraction": feedback_used / count,
            "self_distillation/reprompt_sample_fraction": sum(p is not None for p in active) / count,
        }
        return active, metrics

    def reprompt(self, prompt: Prompt, solution: str, feedback: str) -> Prompt:
        """The teacher's prompt; a chat prompt keeps its earlier turns, and its last, the user's, becomes the filled template."""
        if isinstance(prompt, list):
            if not prompt or prompt[-1].get("role") != "user":
                raise PrefError("sdpo: a chat prompt must end with the user's turn, where the teacher's solution goes; this one ends "
                                f"with {prompt[-1].get('role') if prompt else 'nothing'!r}")
            filled = self.reprompt_template.format(prompt=message_text(prompt[-1]), solution=solution, feedback=feedback)
            return [*prompt[:-1], {"role": "user", "content": filled}]
        return self.reprompt_template.format(prompt=prompt, solution=solution, feedback=feedback)


@dataclass
class SelfTaught:
    """A rollout prepared for SDPO: its rows, their advantages [B], each row's teacher row (`teacher_of` [B], -1: none) in
    `teacher` (the re-prompted teacher's rows), the sampling policy's token log-probs [B, T] at the loss temperature when the
    rollout serves several steps, the rollout's metrics, dr_grpo's length normaliser and the temperature the loss takes
    log-probs and distributions at."""

    sequences: Sequences
    advantages: torch.Tensor
    teacher_of: torch.Tensor
    teacher: Sequences | None
    old_logps: torch.Tensor | None
    metrics: dict[str, float]
    max_completion_length: int | None
    temperature: float

    def select(self, rows: torch.Tensor) -> "SelfTaught":
        rows = rows.cpu()
        chosen = self.teacher_of[rows]
        has = chosen >= 0
        renumbered = torch.full_like(chosen, -1)
        renumbered[has] = torch.arange(int(has.sum()))
        return SelfTaught(self.sequences.select(rows), self.advantages[rows.to(self.advantages.device)], renumbered,
                          self.teacher.select(chosen[has]) if self.teacher is not None and has.any() else None,
                          None if self.old_logps is None else self.old_logps[rows.to(self.old_logps.device)], self.metrics,
                          self.max_completion_length, self.temperature)


class SDPO(MovesReference, Objective):
    """SDPO (TRL's experimental `SDPOTrainer`): GRPO's rollouts, and distillation from the model shown a successful sibling.

    Options (`-o KEY=VALUE`, TRL's `SDPOConfig` names and defaults):
        distillation_weight: the loss is (1 - w) * GRPO's policy loss + w * the distillation loss (1.0: distillation only; 0: GRPO).
        distillation_mode: "sampled_token" (default: the reverse KL's estimate at the sampled token), "full_logits" or "topk_logits".
        distillation_alpha: 0 forward KL, 1 reverse KL (default; sampled_token's only), in between the generalized JSD.
        distillation_topk: the student's likeliest tokens topk_logits compares (required with it, and only with it).
        distillation_add_tail: topk_logits keeps the rest of each distribution's mass as one more bucket (off).
        distillation_is_clip: when a rollout serves several steps, each token's distillation loss times its ratio p_now / p_sampled,
            clipped above at this (2.0; null: off).
        teacher_model_kind: "ema" (default: an average of the policy's weights), "base" (the starting policy, the frozen reference)
            or "live" (the policy itself, without grad); teacher_update_rate, teacher_sync_steps: ema's (0.05, 1), as SDFT's.
        success_reward_threshold: a sample whose reward reaches it is a solution for the others of its group (1.0).
        use_successful_as_teacher: re-prompt with a successful sibling (on); dont_reprompt_on_self_success: never with itself (on).
        include_environment_feedback: also re-prompt with the row's feedback (`feedback_column`, "privileged_context": text) (off);
            environment_feedback_only_without_solution: then only the samples without a solution (off).
        remove_thinking_from_demonstration: drop <think>...</think> from the solution (off).
        reprompt_template, solution_template, feedback_template: the teacher's prompt ({prompt}, {solution}, {feedback}), the
            solution ({successful_previous_attempt}) and the feedback ({feedback_raw}), TRL's texts by default.
        max_reprompt_len: the teacher's prompt keeps its last this many tokens (10240; not --max-prompt-length, which cuts the
            student's, as TRL's).
        loss_type: the policy term's "dapo" (default; each step's tokens, this process's), "grpo", "bnpo" or "dr_grpo";
            scale_rewards ("group", "batch", "none"), epsilon (0.2), epsilon_high, importance_sampling_level ("token", "sequence"),
            max_completion_length (dr_grpo's; default --max-new-tokens), mask_truncated_completions (off): as grpo's.
        temperature: both terms' log-probs and the distributions are taken at it (default: the one the answers were sampled at,
            `--temperature`, as TRL's).
        num_iterations, steps_per_generation: passes over each rollout, and optimizer steps per pass (1, 1).
    """

    def __init__(self, distillation_weight: float = 1.0, distillation_mode: str = "sampled_token", distillation_alpha: float = 1.0,
                 distillation_topk: int | None = None, distillation_add_tail: bool = False, distillation_is_clip: float | None = 2.0,
                 teacher_model_kind: str = "ema", teacher_update_rate: float = 0.05, teacher_sync_steps: int = 1,
                 success_reward_threshold: float = 1.0, use_successful_as_teacher: bool = True, dont_reprompt_on_self_success: bool = True,
                 include_environment_feedback: bool = False, environment_feedback_only_without_solution: bool = False,
                 remove_thinking_from_demonstration: bool = False, reprompt_template: str = REPROMPT, solution_template: str = SOLUTION,
                 feedback_template: str = FEEDBACK, feedback_column: str = "privileged_context", max_reprompt_len: int = 10240,
                 loss_type: str = "dapo", scale_rewards: str = "group", epsilon: float = 0.2, epsilon_high: float | None = None,
                 importance_sampling_level: str = "token", max_completion_length: int | None = None,
                 mask_truncated_completions: bool = False, temperature: float | None = None, num_iterations: int = 1, steps_per_generation: int = 1,
                 processes: Processes | None = None):
        if not 0.0 <= distillation_weight <= 1.0:
            raise PrefError(f"sdpo: distillation_weight must lie in [0, 1] (1: distillation only, 0: GRPO), got {distillation_weight}")
        check_distillation("sdpo", distillation_mode, distillation_alpha, distillation_is_clip, teacher_model_kind, teacher_update_rate,
                           teacher_sync_steps)
        if (distillation_mode == "topk_logits") != (distillation_topk is not None):
            raise PrefError("sdpo: distillation_topk is topk_logits' own: give both (-o distillation_mode=topk_logits -o distillation_topk=100) "
                            "or neither")
        if distillation_topk is not None and distillation_topk < 1:
            raise PrefError(f"sdpo: distillation_topk must be at least 1, got {distillation_topk}")
        if distillation_weight > 0 and not (use_successful_as_teacher or include_environment_feedback):
            raise PrefError("sdpo: with use_successful_as_teacher and include_environment_feedback both off no sample gets a teacher: "
                            "turn one on, or set distillation_weight=0 (GRPO)")
        check_template("sdpo", "reprompt_template", reprompt_template, ("prompt", "solution", "feedback"),
                       ("prompt", *(("solution",) if use_successful_as_teacher else ()), *(("feedback",) if include_environment_feedback else ())))
        check_template("sdpo", "solution_template", solution_template, ("successful_previous_attempt",))
        check_template("sdpo", "feedback_template", feedback_template, ("feedback_raw",))
        if loss_type not in POLICY_LOSSES:
            raise PrefError(f"sdpo: loss_type must be one of {', '.join(POLICY_LOSSES)} (TRL's SDPO), not {loss_type!r}")
        check_options(loss_type, importance_sampling_level, epsilon, epsilon_high)
        if scale_rewards not in SCALE_REWARDS:
            raise PrefError(f"sdpo: scale_rewards must be one of {', '.join(SCALE_REWARDS)}, not {scale_rewards!r}")
        if max_reprompt_len < 1 or (max_completion_length is not None and max_completion_length < 1):
            raise PrefError(f"sdpo: max_reprompt_len and max_completion_length must be at least 1, got {max_reprompt_len} and "
                            f"{max_completion_length}")
        if temperature is not None and not temperature > 0:
            raise PrefError(f"sdpo: temperature must be above 0, got {temperature}")
        for name, value in (("num_iterations", num_iterations), ("steps_per_generation", steps_per_generation)):
            if not isinstance(value, int) or value < 1:
                raise PrefError(f"sdpo: {name} must be a whole number of at least 1, got {value!r}")
        self.weight, self.mode, self.alpha, self.topk = distillation_weight, distillation_mode, distillation_alpha, distillation_topk or 0
        self.add_tail, self.is_clip, self.kind, self.temperature = distillation_add_tail, distillation_is_clip, teacher_model_kind, temperature
        self.reprompting = Reprompting(success_reward_threshold, use_successful_as_teacher, dont_reprompt_on_self_success,
                                       include_environment_feedback, environment_feedback_only_without_solution,
                                       remove_thinking_from_demonstration, reprompt_template, solution_template, feedback_template)
        self.feedback_column, self.max_reprompt_len = feedback_column, max_reprompt_len
        self.loss_type, self.scale_rewards, self.epsilon, self.epsilon_high = loss_type, scale_rewards, epsilon, epsilon_high
        self.importance_sampling_level, self.max_completion_length = importance_sampling_level, max_completion_length
        self.mask_truncated_completions, self.processes = mask_truncated_completions, processes or Processes()
        teacher = distillation_weight > 0 and teacher_model_kind != "live"
        moving = distillation_weight > 0 and teacher_model_kind == "ema"
        self.moving = SyncReference(teacher_update_rate, teacher_sync_steps) if moving else None
        self.needs = ObjectiveNeeds(
            reference=REFERENCE_DISTRIBUTIONS if teacher else NO_REFERENCE,
            data=SAMPLES,
            online=True,
            samples_per_prompt=8,  # TRL's num_generations
            grouped=True,  # a sample's teacher is a sibling's answer; the policy term's advantages compare siblings
            columns=(feedback_column,) if include_environment_feedback else (),
            epochs_per_rollout=num_iterations,
            minibatches_per_rollout=steps_per_generation,
            dataset_builder="prompts",
            moves_reference=moving,
        )

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> SelfTaught:
        """Advantages, the teacher's re-prompted rows and the sampling policy's log-probs, once per rollout."""
        k = group_size(batch, "sdpo")
        sequences, truncated = batch.sequences, truncated_of(batch, self.mask_truncated_completions)
        if truncated is not None and self.mask_truncated_completions:
            sequences = without_truncated(sequences, truncated)
        rewards = batch.scores["reward"].float().cpu()
        every = None
        if self.scale_rewards == "batch" and self.processes.world > 1:  # the std of every process's rewards, as TRL's
            every = torch.tensor(self.processes.gather(rewards.tolist()), dtype=rewards.dtype)
        advantages, std_is_zero = group_advantages(rewards, k, self.scale_rewards, every)
        metrics = rollout_metrics(batch, rewards, std_is_zero)
        teacher, teacher_of = None, torch.full((len(batch),), -1, dtype=torch.long)
        if self.weight > 0:
            prompts, reprompt_metrics = self.reprompting.teacher_prompts(batch.prompts, batch.completions, rewards.tolist(),
                                                                         batch.columns.get(self.feedback_column), k)
            metrics.update(reprompt_metrics)
            # a row whose answer has no token the loss counts (cut by mask_truncated_completions) has nothing to learn from a teacher
            taught = [i for i, p in enumerate(prompts) if p is not None and sequences.completion_mask[i, 1:].any()]
            if taught:
                teacher = teacher_sequences(policy, [prompts[i] for i in taught], sequences.select(taught), self.max_reprompt_len)
                teacher_of[taught] = torch.arange(len(taught))
        reused = self.needs.epochs_per_rollout * self.needs.minibatches_per_rollout > 1
        temperature = self.temperature or batch.temperature
        old_logps = token_logps(policy, sequences, temperature) if reused else None
        return SelfTaught(sequences, advantages, teacher_of, teacher, old_logps, metrics, self.max_completion_length or batch.max_new_tokens,
                          temperature)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """(1 - w) * GRPO's loss + w * the distillation loss, with TRL's metrics (`self_distillation/*`) and grpo's."""
        if self.needs.reference != NO_REFERENCE and reference is None:
            raise PrefError("sdpo's teacher is the reference: do not pass --reference none (or use -o teacher_model_kind=live)")
        rows = batch.prepared(self, policy, reference)
        sequences = rows.sequences
        hidden = policy.hidden_states(sequences)
        device, head = hidden.device, policy.output_head()
        metrics = dict(rows.metrics)
        if self.weight < 1.0:
            policy_loss = self.policy_loss(rows, hidden, head, metrics)
            metrics["self_distillation/policy_loss"] = policy_loss.item()
        if self.weight > 0.0:
            distillation_loss, per_token = self.distillation_loss(policy, reference, rows, hidden, head)
            metrics["self_distillation/distillation_loss"] = per_token
        if self.weight == 0.0:
            return policy_loss, metrics
        if self.weight == 1.0:
            return distillation_loss, metrics
        return (1 - self.weight) * policy_loss + self.weight * distillation_loss.to(device), metrics

    def policy_loss(self, rows: SelfTaught, hidden: torch.Tensor, head: OutputHead, metrics: dict[str, float]) -> torch.Tensor:
        """GRPO's clipped loss of the sampled tokens' log-probs at the temperature (TRL's SDPO `_compute_policy_loss`)."""
        device = hidden.device
        where = rows.sequences.completion_mask.to(device).bool()
        where[:, 0] = False  # token t is predicted at position t - 1
        picked = sampled_logps(hidden[:, :-1][where[:, 1:]], head, rows.sequences.input_ids.to(device)[where], rows.temperature)
        logps = torch.zeros(where.shape, device=device).masked_scatter(where, picked)
        old = logps.detach() if rows.old_logps is None else rows.old_logps.to(device)
        mask = where.float()
        loss, stats = grpo_loss(logps, old, rows.advantages.to(device), mask, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                                loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
                                max_completion_length=rows.max_completion_length or int(mask.sum(-1).max().clamp(min=1)))
        metrics.update(loss_metrics(stats, mask))
        return loss

    def distillation_loss(self, policy: Policy, reference: Reference | None, rows: SelfTaught, hidden: torch.Tensor,
                          head: OutputHead) -> tuple[torch.Tensor, float]:
        """The mean over all B samples of each taught one's mean per-token loss (0 for the others), and the mean over the taught
        tokens (TRL's `self_distillation/distillation_loss`, 0 with none)."""
        taught = (rows.teacher_of >= 0).nonzero()[:, 0]
        if rows.teacher is None or not len(taught):  # zero, joined to the graph through the body and the head, so backward runs
            nothing = over_chunks(lambda logits: logits.sum(-1, keepdim=True).T, hidden[:0, 0], head, None, None)
            return hidden.sum() * 0.0 + nothing.sum() * 0.0, 0.0
        device = hidden.device
        sequences = rows.sequences.select(taught)
        with torch.no_grad():
            teacher = (policy if self.kind == "live" else reference).hidden_states(rows.teacher).to(device)
        # the same answer tokens in both rows: all of the answer's, after the first where the student's starts at position 0
        first = sequences.completion_mask[:, 0].long().to(device)
        mine = loss_tokens(sequences.completion_mask.to(device), first)[:, 1:]
        theirs = loss_tokens(rows.teacher.completion_mask.to(device), first)[:, 1:]
        if int(mine.sum()) != int(theirs.sum()):
            raise PrefError("sdpo: the teacher's rows hold other answer tokens than the student's; this is a bug in pref, please report it")
        # the taught rows' positions picked from every row's hidden states: no copy of those rows' [n, T, H] states
        everywhere = torch.zeros(hidden.shape[:1] + mine.shape[1:], dtype=torch.bool, device=device)
        everywhere[taught.to(device)] = mine
        losses, sampled = over_chunks(
            lambda s, t, y: token_losses(s, t, y, self.mode, self.alpha, self.topk, self.add_tail, rows.temperature),
            hidden[:, :-1][everywhere], head, teacher[:, :-1][theirs], head if self.kind == "live" else reference.output_head(),
            sequences.input_ids.to(device)[:, 1:][mine])
        if rows.old_logps is not None and self.is_clip is not None:  # the ratio now / when sampled, clipped above, without grad
            old = rows.old_logps[taught.to(rows.old_logps.device)].to(device)[:, 1:][mine]
            losses = losses * torch.exp((sampled - old).clamp(-20.0, 20.0)).clamp(max=self.is_clip)
        per_answer = torch.zeros(len(taught), device=device, dtype=losses.dtype).index_add(0, mine.nonzero()[:, 0], losses)
        loss = (per_answer / mine.sum(-1).clamp(min=1)).sum() / len(rows.sequences)
        return loss, losses.detach().sum().item() / max(losses.numel(), 1)


@hookimpl
def register_objectives(register):
    register("sdpo", SDPO)
