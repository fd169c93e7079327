"""The `response-length` reward: answers close to a target number of words score best."""

from __future__ import annotations

from typing import ClassVar

import torch

from pref import PrefError, Prompt, RewardSource, hookimpl


class ResponseLength(RewardSource):
    """Rewards answers of about `target` words: reward = -|words - target|.

    Options:
        target: the number of words wanted (default 5).
    """

    default_prompts: ClassVar[list[str]] = [
        "Describe the sea.",
        "What is a good breakfast?",
        "Tell me about your day.",
        "Why do cats purr?",
    ]

    def __init__(self, target: int = 5):
        if target < 0:
            raise PrefError(f"response-length: target must not be negative, got {target}")
        self.target = target

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward` and `words`, float [B]."""
        words = torch.tensor([float(len(text.split())) for text in completions])
        return {"reward": -(words - self.target).abs(), "words": words}


@hookimpl
def register_rewards(register):
    register("response-length", ResponseLength)
