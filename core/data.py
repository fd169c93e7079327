"""Feeding examples to the loop: seeded, resumable order, one share per process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pref.examples import LabeledExample, PreferenceExample, TextExample
from pref.interfaces import LabeledBatch, PairBatch, Policy


def collate(policy: Policy, examples: Sequence[Any]) -> Any:
    """Tokenize a list of records of one type into the batch type objectives expect."""
    first = examples[0]
    if isinstance(first, PreferenceExample):
        prompts = [e.prompt for e in examples]
        return PairBatch(
            chosen=policy.encode(prompts, [e.chosen for e in examples]),
            rejected=policy.encode(prompts, [e.rejected for e in examples]),
        )
    if isinstance(first, LabeledExample):
        return LabeledBatch(
            sequences=policy.encode([e.prompt for e in examples], [e.completion for e in examples]),
            labels=torch.tensor([e.label for e in examples]),
        )
    if isinstance(first, TextExample):
        return policy.encode([""] * len(examples), [e.text for e in examples])
    raise TypeError(f"cannot batch records of type {type(first).__name__}")


class ShuffledBatches:
    """Endless batches over `items`, reshuffled each epoch from the seed.

    All processes draw the same order; process `rank` of `world` takes its own
    `batch_size` slice of each global batch. `state()` is all it takes to
    continue exactly where a run stopped.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if not items:
            raise ValueError("no items to batch")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def next(self) -> list[Any]:
        """The next `batch_size` items of this process, wrapping into a new epoch when needed."""
        global_size = self.batch_size * self.world
        picked = []
        for offset in range(global_size):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffle(self.epoch)
            if offset // self.batch_size == self.rank:
                picked.append(self.items[self._order[self.position]])
            self.position += 1
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)


class OfflineBatches:
    """Batches from a fixed dataset."""

    def __init__(self, policy: Policy, examples: Sequence[Any], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.policy = policy
        self.order = ShuffledBatches(examples, batch_size, seed, rank, world)

    def next(self) -> tuple[Any, dict[str, float]]:
        return collate(self.policy, self.order.next()), {}

    def state(self) -> dict[str, int]:
        return self.order.state()

    def load_state(self, state: dict[str, int]) -> None:
        self.order.load_state(state)

