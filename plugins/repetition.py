"""The `repetition` reward: a penalty for completions that repeat themselves."""

from __future__ import annotations

from typing import ClassVar

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource


def repeated_fraction(text: str, n: int) -> float:
    """The share of the text's word n-grams that already occurred earlier in it.

    Words are the lower-cased, whitespace-separated tokens. "a b a b a" has the bigrams
    ab, ba, ab, ba: two are repeats, so 2 / 4 = 0.5. A text of fewer than n words has no
    n-grams and repeats nothing (0.0).
    """
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


class RepetitionReward(RewardSource):
    """-(share of repeated word n-grams) in each completion: 0.0 for no repeats, towards -1 for a loop.

    Only repetition is scored; an empty or very short answer scores 0.0 too, so combine
    this reward with another (`--reward weighted`) when length or content matters.

    Options:
        n: the n-gram length in words (default 2).
    """

    default_prompts: ClassVar[list[str]] = [
        "Once upon a time",
        "Tell me a story about a dog.",
        "Describe the sea.",
        "The weather today is",
        "Write a few words about your home.",
        "What did you do this morning?",
        "My favourite food is",
        "Tell me about the city at night.",
    ]

    def __init__(self, n: int = 2):
        if not isinstance(n, int) or n < 1:
            raise PrefError(f"repetition: n must be a whole number of at least 1, not {n!r}")
        self.n = n

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward` = -`repetition`, the share of repeated n-grams, both float [B]."""
        repetition = torch.tensor([repeated_fraction(text, self.n) for text in completions], dtype=torch.float32)
        return {"reward": -repetition, "repetition": repetition}


@hookimpl
def register_rewards(register):
    register("repetition", RepetitionReward)
