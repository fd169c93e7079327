"""Online batches: sample K completions per prompt, score them, select pairs or sets."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from pref.data import ShuffledBatches
from pref.errors import PrefError
from pref.examples import Prompt
from pref.metrics import distinct_ratio, entropy_bits
from pref.interfaces import CandidatePool, LabeledBatch, Objective, PairBatch, PairSelector, Policy, RewardSource, SamplingConfig


class OnlineBatches:
    """Each `next()` samples from the current policy and returns a training batch.

    All P x K samples of a step come from one batched `generate` call. Rows
    the selector did not use are dropped; when no prompt of a draw gives a
    usable pair, the next prompts are drawn (up to `MAX_DRAWS` times).
    """

    MAX_DRAWS = 10

    def __init__(
        self,
        policy: Policy,
        prompts: Sequence[Prompt],
        reward: RewardSource,
        selector: PairSelector,
        objective: Objective,
        sampling: SamplingConfig,
        prompts_per_step: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.policy = policy
        self.reward = reward
        self.selector = selector
        self.objective = objective
        self.sampling = sampling
        self.order = ShuffledBatches(list(prompts), prompts_per_step, seed, rank, world)

    def next(self) -> tuple[Any, dict[str, float]]:
        for draw in range(self.MAX_DRAWS):
            batch, metrics = self._draw()
            if batch is not None:
                return batch, {**metrics, "samples/redraws": float(draw)}
        raise PrefError(
            f"no usable pair in {self.MAX_DRAWS} draws of prompts: every pool was all-equal or unusable; "
            "raise --samples-per-prompt or --temperature, or check the reward"
        )

    def _draw(self) -> tuple[Any, dict[str, float]]:
        prompts = self.order.next()
        k = self.objective.samples_per_prompt

        t0 = time.perf_counter()
        completions = self.policy.generate(prompts, k, self.sampling)
        t1 = time.perf_counter()
        flat_prompts = [p for p in prompts for _ in range(k)]
        flat_completions = [c for row in completions for c in row]
        # on the CPU, like the log-probs below, whatever device the reward computed them on
        scores = {name: values.detach().reshape(len(prompts), k).float().cpu() for name, values in self.reward.score(flat_prompts, flat_completions).items()}
        if "reward" not in scores:
            raise PrefError(f"reward {type(self.reward).__name__} gave no score named 'reward' (it gave {', '.join(scores) or 'none'})")
        logps = None
        if getattr(self.selector, "needs_logps", False):
            with torch.no_grad():
                logps = self.policy.logps(self.policy.encode(flat_prompts, flat_completions)).sequence.reshape(len(prompts), k).cpu()
        t2 = time.perf_counter()
        selection = self.selector.select(CandidatePool(list(prompts), completions, scores, logps))
        t3 = time.perf_counter()

        rewards = scores["reward"]
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "reward/max": rewards.max().item(),
            "samples/distinct_ratio": distinct_ratio(flat_completions),
            "samples/entropy": entropy_bits(flat_completions),
            "pairs/usable_fraction": len({p for p, _, _ in selection.pairs} | {p for p, _ in selection.accepted + selection.rejected}) / len(prompts),
            "time/sampling": t1 - t0,
            "time/scoring": (t2 - t1) + (t3 - t2),
            **selection.metrics,
        }
        return self._batch(prompts, completions, selection), metrics

    def _batch(self, prompts: list[Prompt], completions: list[list[str]], selection: Any) -> Any:
        if self.objective.data_kind == "sets":
            rows = [(p, k, True) for p, k in selection.accepted] + [(p, k, False) for p, k in selection.rejected]
            if not rows:
                return None
            return LabeledBatch(
                sequences=self.policy.encode([prompts[p] for p, _, _ in rows], [completions[p][k] for p, k, _ in rows]),
                labels=torch.tensor([label for _, _, label in rows]),
            )
        if not selection.pairs:
            return None
        chosen_prompts = [prompts[p] for p, _, _ in selection.pairs]
        return PairBatch(
            chosen=self.policy.encode(chosen_prompts, [completions[p][c] for p, c, _ in selection.pairs]),
            rejected=self.policy.encode(chosen_prompts, [completions[p][r] for p, _, r in selection.pairs]),
        )

    def state(self) -> dict[str, int]:
        return self.order.state()

    def load_state(self, state: dict[str, int]) -> None:
        self.order.load_state(state)
