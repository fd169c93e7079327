"""pref's evaluators: the validation loss on held-out records, answers to test prompts, and the reward on held-out prompts.

- `validation-loss`, on whenever the run holds records out (`--validation-split`,
  `--validation-dataset`), logged as `validation/loss` (the loop keeps the model with
  the lowest in `best/`):
  - offline objectives: the objective's own loss on held-out batches, without grad
    (the quantity training lowers, on data it does not see);
  - online objectives: their loss needs fresh samples and a reward, so instead the
    policy's per-token negative log-likelihood of the held-out records' text given
    their prompt (`text_nll`): how well it still models the data.
- `test-prompts`, on with `--test-prompt`: each prompt answered greedily (no random
  numbers are drawn, so a resumed run stays identical), appended to `generations.jsonl`
  as `{"step", "prompt", "text"}` lines (a resumed run first drops the lines of the steps it trains again).
- `reward`, on for online objectives that hold records out: the run's reward on answers sampled for
  the held-out prompts, `eval/reward` (TRL's GRPO and RLOO evaluate so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from pref import Evaluator, Objective, Policy, Processes, Prompt, Reference, RewardSource, SamplingConfig, hookimpl
from pref.data import collate
from pref.errors import PrefError
from pref.plugins.loggers import keep_steps_up_to
from pref.examples import ConversationExample, LabeledExample, PreferenceExample, PromptExample, TextExample
from pref.online import sample_pool
from pref.policy import unwrap
from pref.reference import FrozenReference

GENERATIONS_FILE = "generations.jsonl"


def scored_text(record: Any) -> tuple[Prompt, str]:
    """The (prompt, text) a likelihood measure scores for a record: the text given the prompt.

    TextExample: its text; PreferenceExample: the chosen answer; LabeledExample: its
    completion; a bare prompt or a PromptExample: the prompt's own text (given an empty prompt).
    """
    if isinstance(record, PromptExample):
        record = record.prompt
    if isinstance(record, ConversationExample):  # its first answer, given the turns before it
        first = next(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        return record.messages[:first], record.messages[first]["content"]
    if isinstance(record, TextExample):
        return record.prompt, record.text
    if isinstance(record, PreferenceExample):
        return record.prompt, record.chosen
    if isinstance(record, LabeledExample):
        return record.prompt, record.completion
    if isinstance(record, str):
        return "", record
    if isinstance(record, list):
        return "", "\n".join(m["content"] for m in record)
    raise PrefError(f"cannot score records of type {type(record).__name__} by likelihood")


@torch.no_grad()
def text_nll(model: torch.nn.Module, policy: Any, records: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
    """Per-token negative log-likelihood [N] of each record's scored text under `model` (bare, not wrapped).

    `policy` only tokenizes (`encode`); `model` may be the policy's own model or a frozen copy.
    """
    scorer = FrozenReference(model)  # eval mode and no grad, training mode restored after
    values = []
    for start in range(0, len(records), batch_size):
        prompts, texts = zip(*(scored_text(r) for r in records[start : start + batch_size]))
        values.append(-scorer.logps(policy.encode(list(prompts), list(texts))).mean.float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


class ValidationLoss(Evaluator):
    """The objective's loss on held-out records (offline), or the policy's per-token NLL of them (online): validation/loss."""

    def __init__(self, objective: Objective, processes: Processes, batch_size: int = 8):
        self.objective, self.processes, self.batch_size = objective, processes, batch_size

    @torch.no_grad()
    def evaluate(self, step: int, policy: Policy, reference: Reference | None, records: list[Any]) -> dict[str, float]:
        """Every process computes it over all the records (the same forward passes, so wrapped models stay in step)."""
        if not records:
            return {}
        model = policy.model
        was_training = model.training
        model.eval()
        try:
            if self.objective.needs.online:
                loss = text_nll(unwrap(model), policy, records, self.batch_size).mean().item()
            else:
                total = 0.0
                for start in range(0, len(records), self.batch_size):
                    chunk = records[start : start + self.batch_size]
                    total += self.objective.loss(policy, reference, collate(policy, chunk))[0].item() * len(chunk)
                loss = total / len(records)
        finally:
            model.train(was_training)
        return {"validation/loss": self.processes.mean(torch.tensor(loss, dtype=torch.float64)).item()}


class TestPrompts(Evaluator):
    """Greedy answers to `prompts`, appended to the run's generations.jsonl."""

    def __init__(self, prompts: list[str], output_dir: str, processes: Processes, sampling: SamplingConfig = SamplingConfig(), start_step: int = 0):
        if isinstance(prompts, str) or not prompts:
            raise PrefError("the evaluator test-prompts needs a list of prompts: pass --test-prompt TEXT")
        self.prompts, self.path, self.rank = list(prompts), os.path.join(output_dir, GENERATIONS_FILE), processes.rank
        self.sampling = SamplingConfig(max_new_tokens=sampling.max_new_tokens, temperature=0.0)
        self.start_step, self.first = start_step, True

    def evaluate(self, step: int, policy: Policy, reference: Reference | None, records: list[Any]) -> dict[str, float]:
        # every process answers (the same greedy answers): a sharded model's forward needs them all; one writes
        answers = policy.generate(self.prompts, 1, self.sampling)
        if self.rank == 0:
            if self.first:  # a resumed run trains the steps after its checkpoint again, and may evaluate others of them
                keep_steps_up_to(self.path, min(self.start_step, step - 1))  # a resume that stops at once answers its checkpoint's step
                self.first = False
            with open(self.path, "a", encoding="utf-8") as f:
                for prompt, (text,) in zip(self.prompts, answers):
                    f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
        return {}


class HeldOutReward(Evaluator):
    """The run's reward on the policy's answers to the held-out prompts (online, with held-out records): eval/reward.

    Each held-out record's prompt is answered `samples` times as the run samples (its temperature, top-p, ...; TRL's GRPO
    and RLOO evaluate so), every process answering its share; the reward scores each answer, given the columns of the
    record's row it reads. Logs `eval/reward` and the mean of each other score (`eval/quality`, ...), over every answer.
    """

    def __init__(self, run_reward: RewardSource | None, sampling: SamplingConfig | None, processes: Processes, batch_size: int = 8,
                 samples: int = 1):
        if run_reward is None or sampling is None:
            raise PrefError("the evaluator reward scores answers with the run's reward, which only an online run has; drop --evaluator reward")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise PrefError(f"the evaluator reward: samples (answers per held-out prompt) must be a whole number of at least 1, got {samples!r}")
        self.reward, self.sampling, self.processes, self.batch_size, self.samples = run_reward, sampling, processes, batch_size, samples

    def evaluate(self, step: int, policy: Policy, reference: Reference | None, records: list[Any]) -> dict[str, float]:
        if not records:
            return {}
        pool = sample_pool(policy, records, self.reward, self.samples, self.sampling, self.batch_size, self.processes,
                           sampling_together=self.processes.world > 1, what="answers to the held-out prompts")
        return {f"eval/{name}": values.float().nanmean().item() for name, values in pool.scores.items()}  # of the answers it scored


@hookimpl
def register_evaluators(register):
    register("validation-loss", ValidationLoss)
    register("test-prompts", TestPrompts)
    register("reward", HeldOutReward)
