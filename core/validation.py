"""Evaluation during training: validation loss on held-out data, the best model, test-prompt generations.

What is measured:

- offline objectives: the objective's own loss on held-out batches, without grad
  (the quantity training lowers, on data it does not see);
- online objectives: their loss needs fresh samples and a reward, so instead the
  policy's per-token negative log-likelihood of the held-out records' text given
  their prompt (see `scored_text`): how well it still models the data.

Either is logged as `validation/loss`. The model with the lowest value so far is
written to `best/` (Hugging Face format, atomically) with its step and value in
`best.json`. Test prompts are answered greedily (no random numbers are drawn, so
a resumed run stays identical) and appended to `generations.jsonl` as
`{"step", "prompt", "text"}` lines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from pref.checkpoint import write_atomically
from pref.errors import PrefError
from pref.examples import LabeledExample, PreferenceExample, Prompt, TextExample
from pref.interfaces import SamplingConfig
from pref.sharding import is_sharded, whole_state_dict

BEST_DIR = "best"
BEST_FILE = "best.json"
GENERATIONS_FILE = "generations.jsonl"


def scored_text(record: Any) -> tuple[Prompt, str]:
    """The (prompt, text) a likelihood measure scores for a record: the text given the prompt.

    TextExample: its text; PreferenceExample: the chosen answer; LabeledExample: its
    completion; a bare prompt: the prompt's own text (given an empty prompt).
    """
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
    from pref.reference import FrozenReference

    scorer = FrozenReference(model)  # eval mode and no grad, training mode restored after
    values = []
    for start in range(0, len(records), batch_size):
        prompts, texts = zip(*(scored_text(r) for r in records[start : start + batch_size]))
        values.append(-scorer.logps(policy.encode(list(prompts), list(texts))).mean.float().cpu())
    return torch.cat(values) if values else torch.zeros(0)


def hold_out(example_sets: list[list[Any]], fraction: float, seed: int) -> tuple[list[list[Any]], list[Any]]:
    """Hold out `fraction` of each dataset (at least one record, seeded): (training sets, held-out records)."""
    if not fraction:
        return example_sets, []
    kept, held = [], []
    for index, examples in enumerate(example_sets):
        count = max(1, round(fraction * len(examples)))
        if count >= len(examples):
            raise PrefError(f"--validation-split {fraction}: dataset {index + 1} has {len(examples)} records, too few to hold some out")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 7_919 + index)).tolist()
        held.extend(examples[i] for i in sorted(order[:count]))
        kept.append([examples[i] for i in sorted(order[count:])])
    return kept, held


class Evaluation:
    """Runs every `eval_every` steps and at the last step, when there is something to evaluate.

    Every process computes the validation loss over all held-out records (the same
    forward passes, so wrapped models stay in step); only the main process writes.
    """

    def __init__(self, config: Any, accelerator: Any, policy: Any, objective: Any, reference: Any, records: list[Any], out_dir: str,
                 online: bool = False, max_new_tokens: int = SamplingConfig.max_new_tokens):
        self.config = config
        self.accelerator = accelerator
        self.policy = policy
        self.objective = objective
        self.reference = reference
        self.records = records
        self.out_dir = out_dir
        self.online = online  # the objective's `needs.online`
        self.max_new_tokens = max_new_tokens  # for test-prompt answers
        self.best = math.inf
        best_file = os.path.join(out_dir, BEST_FILE)
        if os.path.exists(best_file):  # a resumed run keeps its best so far
            with open(best_file) as f:
                self.best = json.load(f)["validation_loss"]

    def due(self, step: int) -> bool:
        if not (self.records or self.config.test_prompts):
            return False
        every = self.config.eval_every
        return step == self.config.steps or bool(every and step % every == 0)

    def run(self, step: int) -> dict[str, float]:
        """Evaluate at `step`; returns the metrics to log (`validation/loss` when there is held-out data)."""
        metrics = {}
        if self.records:
            loss = self.validation_loss()
            if self.accelerator.num_processes > 1:  # one value on every process, so that all decide alike below
                loss = self.accelerator.reduce(torch.tensor(loss, device=self.accelerator.device), reduction="mean").item()
            metrics["validation/loss"] = loss
            if loss < self.best:
                from pref.policy import unwrap

                self.best = loss
                model = unwrap(self.policy.model)
                weights = whole_state_dict(model) if is_sharded(model) else None  # a collective: every process gathers
                if self.accelerator.is_main_process:
                    self.save_best(step, loss, weights)
        if self.config.test_prompts and self.accelerator.is_main_process:
            self.write_generations(step)
        self.accelerator.wait_for_everyone()
        return metrics

    @torch.no_grad()
    def validation_loss(self) -> float:
        from pref.data import collate
        from pref.policy import unwrap

        model = self.policy.model
        was_training = model.training
        model.eval()
        try:
            if self.online:
                return text_nll(unwrap(model), self.policy, self.records, self.config.batch_size).mean().item()
            total = 0.0
            for start in range(0, len(self.records), self.config.batch_size):
                chunk = self.records[start : start + self.config.batch_size]
                with self.accelerator.autocast():
                    loss, _ = self.objective.loss(self.policy, self.reference, collate(self.policy, chunk))
                total += loss.item() * len(chunk)
            return total / len(self.records)
        finally:
            model.train(was_training)

    def save_best(self, step: int, loss: float, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The policy into best/ (`weights`: a sharded model's, gathered whole) and its step and loss into best.json."""
        write_atomically(os.path.join(self.out_dir, BEST_DIR), lambda path: self.policy.save(path, weights))
        measure = "per-token nll" if self.online else "objective loss"
        record = {"step": step, "validation_loss": loss, "measure": measure}

        def write(path: str) -> None:
            with open(path, "w") as f:
                json.dump(record, f, indent=2)

        write_atomically(os.path.join(self.out_dir, BEST_FILE), write)

    def write_generations(self, step: int) -> None:
        prompts = list(self.config.test_prompts)
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        answers = self.policy.generate(prompts, 1, sampling)
        with open(os.path.join(self.out_dir, GENERATIONS_FILE), "a", encoding="utf-8") as f:
            for prompt, (text,) in zip(prompts, answers):
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
