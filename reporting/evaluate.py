"""Sample a model and report what a reward plugin makes of the samples (`pref eval`, `pref compare`, bench/divpo_nouns.py)."""

from __future__ import annotations

import math

import torch

from pref.examples import Prompt
from pref.interfaces import Policy, RewardSource, SamplingConfig


def sample_answers(policy: Policy, prompts: list[Prompt], samples: int, sampling: SamplingConfig) -> tuple[list[Prompt], list[str]]:
    """`samples` answers spread evenly over `prompts`, from one batched generate call."""
    k = math.ceil(samples / len(prompts))
    answers = policy.generate(prompts, k, sampling)
    flat = [(p, a) for p, row in zip(prompts, answers) for a in row]
    # interleave so that truncating to `samples` keeps every prompt represented
    order = sorted(range(len(flat)), key=lambda i: (i % k, i // k))[:samples]
    return [flat[i][0] for i in order], [flat[i][1] for i in order]


def evaluate(policy: Policy, reward: RewardSource, prompts: list[Prompt], samples: int = 200, sampling: SamplingConfig | None = None, seed: int = 0) -> dict[str, float]:
    """The reward's report over `samples` answers of the policy, seeded."""
    return evaluate_with_answers(policy, reward, prompts, samples, sampling, seed)[0]


def evaluate_with_answers(policy: Policy, reward: RewardSource, prompts: list[Prompt], samples: int = 200, sampling: SamplingConfig | None = None,
                          seed: int = 0) -> tuple[dict[str, float], list[str]]:
    """`evaluate`'s report, and the `samples` answers it was computed from."""
    torch.manual_seed(seed)
    sampling = sampling or SamplingConfig(max_new_tokens=8, temperature=1.0)
    used_prompts, answers = sample_answers(policy, prompts, samples, sampling)
    return reward.report(used_prompts, answers), answers
