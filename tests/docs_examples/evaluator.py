"""The `held-out-reward` evaluator: how a reward plugin scores the policy's greedy answers to the held-out prompts."""

from __future__ import annotations

import dataclasses
from typing import Any

from pref import Evaluator, Policy, PrefError, Reference, SamplingConfig, hookimpl
from pref.examples import prompt_of


class HeldOutReward(Evaluator):
    """Mean reward of greedy answers to the held-out records' prompts, logged as `eval/REWARD`.

    Options:
        reward: the reward plugin that scores the answers (`pref list-plugins --kind reward`).
        limit: at most this many held-out prompts (answering takes time).
    """

    def __init__(self, reward: str, registry: Any, sampling: SamplingConfig, limit: int = 16):
        if limit < 1:
            raise PrefError(f"held-out-reward: limit must be at least 1, got {limit}")
        self.name, self.reward, self.limit = reward, registry.create("reward", reward), limit
        # greedy: every process gives the same answers, so every process logs the same figure
        self.sampling = dataclasses.replace(sampling, temperature=0.0)

    def evaluate(self, step: int, policy: Policy, reference: Reference | None, records: list[Any]) -> dict[str, float]:
        prompts = [prompt_of(record) for record in records[: self.limit]]
        if not prompts:
            return {}
        answers = [answer for (answer,) in policy.generate(prompts, 1, self.sampling)]
        return {f"eval/{self.name}": self.reward.score(prompts, answers)["reward"].float().mean().item()}


@hookimpl
def register_evaluators(register):
    register("held-out-reward", HeldOutReward)
