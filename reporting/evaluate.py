"""Sample a model and report what a reward plugin makes of the samples (`pref eval`, `pref compare`, bench/divpo_nouns.py)."""

from __future__ import annotations

import math
from typing import Any

import torch

from pref.examples import columns_of, prompt_of
from pref.interfaces import Policy, RewardSource, SamplingConfig
from pref.online import completion_ids


def sample_answers(policy: Policy, prompts: list[Any], samples: int, sampling: SamplingConfig) -> tuple[list[Any], list[str]]:
    """`samples` answers spread evenly over `prompts` (or records with a prompt), from one batched generate call: the prompt
    (or record) of each answer, and the answers."""
    k = math.ceil(samples / len(prompts))
    answers = policy.generate([prompt_of(p) for p in prompts], k, sampling)
    flat = [(p, a) for p, row in zip(prompts, answers) for a in row]
    # interleave so that truncating to `samples` keeps every prompt represented
    order = sorted(range(len(flat)), key=lambda i: (i % k, i // k))[:samples]
    return [flat[i][0] for i in order], [flat[i][1] for i in order]


def evaluate(policy: Policy, reward: RewardSource, prompts: list[Any], samples: int = 200, sampling: SamplingConfig | None = None, seed: int = 0) -> dict[str, float]:
    """The reward's report over `samples` answers of the policy, seeded."""
    return evaluate_with_answers(policy, reward, prompts, samples, sampling, seed)[0]


def evaluate_with_answers(policy: Policy, reward: RewardSource, prompts: list[Any], samples: int = 200, sampling: SamplingConfig | None = None,
                          seed: int = 0) -> tuple[dict[str, float], list[str]]:
    """`evaluate`'s report, and the `samples` answers it was computed from. `prompts` may be records (a dataset's): a reward that
    reads columns of their rows gets them."""
    torch.manual_seed(seed)
    sampling = sampling or SamplingConfig(max_new_tokens=8, temperature=1.0)
    used, answers = sample_answers(policy, prompts, samples, sampling)
    asked = [prompt_of(record) for record in used]
    columns = {name: [columns_of(record)[name] for record in used] for name in reward.columns}
    if reward.reads_completion_ids:  # the answers came back as texts: their tokens again, with the end token
        columns["completion_ids"] = completion_ids(policy.encode(asked, answers))
    return reward.report(asked, answers, **columns), answers
