"""Feeding examples to the loop: seeded, resumable order, one share per process."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pref.errors import ModelNotLoaded, PrefError
from pref.examples import ConversationExample, LabeledExample, PreferenceExample, TextExample
from pref.interfaces import PAIRS, SETS, LabeledBatch, Minibatch, ObjectiveNeeds, PairBatch, Policy, Rollout
from pref.sequences import Sequences


def collate(policy: Policy, examples: Sequence[Any]) -> Any:
    """Tokenize a list of records of one type into the batch type objectives expect."""
    first = examples[0]
    if isinstance(first, PreferenceExample):
        prompts, golds = [e.prompt for e in examples], [e.gold for e in examples]
        return PairBatch(
            chosen=policy.encode(prompts, [e.chosen for e in examples]),
            rejected=policy.encode(prompts, [e.rejected for e in examples]),
            gold=policy.encode(prompts, golds) if None not in golds else None,
        )
    if isinstance(first, LabeledExample):
        return LabeledBatch(
            sequences=policy.encode([e.prompt for e in examples], [e.completion for e in examples]),
            labels=torch.tensor([e.label for e in examples]),
        )
    if isinstance(first, TextExample):
        return policy.encode([e.prompt for e in examples], [e.text for e in examples])
    if isinstance(first, ConversationExample):
        return LabeledBatch(sequences=policy.encode_conversations([e.messages for e in examples]), labels=torch.ones(len(examples), dtype=torch.bool))
    raise TypeError(f"cannot batch records of type {type(first).__name__}")


def sequences_of(batch: PairBatch | LabeledBatch | Minibatch | Sequences) -> list[Sequences]:
    """The rows a training batch holds: a `PairBatch`'s chosen and rejected, ...; a `Minibatch` its own rows of the rollout."""
    if isinstance(batch, PairBatch):
        return [batch.chosen, batch.rejected, *([batch.gold] if batch.gold is not None else [])]
    if isinstance(batch, LabeledBatch):
        return [batch.sequences]
    if isinstance(batch, Minibatch):
        return [batch.rollout.batch.sequences.select(batch.rows)]
    return [batch]


def count_tokens(batch: PairBatch | LabeledBatch | Minibatch | Sequences) -> tuple[int, int]:
    """(real tokens, padded positions) over the rows of a training batch."""
    found = sequences_of(batch)
    return sum(int(s.attention_mask.sum()) for s in found), sum(s.attention_mask.numel() for s in found)


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
        self.load_state({"epoch": 0, "position": 0})

    def _shuffle(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def next(self) -> list[Any]:
        """The next `batch_size` items of this process, wrapping into a new epoch when needed."""
        global_size = self.batch_size * self.world
        picked = []
        for offset in range(global_size):
            if self.position >= len(self._order):
                self.load_state({"epoch": self.epoch + 1, "position": 0})
            if offset // self.batch_size == self.rank:
                picked.append(self.items[self._order[self.position]])
            self.position += 1
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def metrics(self) -> dict[str, float]:
        """A shuffled order has nothing to report (a curriculum reports its weights)."""
        return {}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)


def rows_per_batch(rows: int, batch_size: int, world: int) -> int:
    """Rows of an offline dataset each of `world` processes takes per batch: `batch_size`, or fewer when the dataset holds fewer
    than `batch_size * world` rows: then a batch holds them all (as a DataLoader gives a batch of every row), never one twice."""
    if rows < world:
        raise PrefError(f"the dataset has {rows} training rows for {world} processes: each needs one; give more data or run fewer processes")
    return min(batch_size, rows // world)


class OfflineBatches:
    """Batches from a fixed dataset.

    `order` decides which examples come next: by default a `ShuffledBatches` over them;
    any object with `next()` (this process's examples), `state()`, `load_state()` and
    `metrics()` will do, such as a sampler (`pref.plugins.curriculum.Curriculum`).
    `after_draw` is called after each batch (it trains the objective's second model) and returns metrics.
    """

    def __init__(self, policy: Policy, examples: Sequence[Any], batch_size: int, seed: int, rank: int = 0, world: int = 1, order: Any = None,
                 after_draw: Callable[[], dict[str, float]] | None = None):
        self.policy = policy
        self.order = order if order is not None else ShuffledBatches(examples, batch_size, seed, rank, world)
        self.after_draw = after_draw

    def next(self) -> tuple[Any, dict[str, float]]:
        batch, metrics = collate(self.policy, self.order.next()), self.order.metrics()
        return batch, {**metrics, **self.after_draw()} if self.after_draw is not None else metrics

    def state(self) -> dict[str, int]:
        return self.order.state()

    def load_state(self, state: dict[str, int]) -> None:
        self.order.load_state(state)


class RolloutSteps:
    """Serves each fresh batch as `epochs x minibatches` optimizer steps (PPO's rollout reuse).

    `draw()` returns a fresh (batch, metrics); `order` is what decides which data the next
    draw takes (it has `state()` and `load_state()`). Each pass over a rollout shuffles its
    rows, seeded by the seed and the rollout's number, and cuts them into `minibatches`
    near-equal `Minibatch`es. Every step reports its rollout's metrics, its timings (`time/...`)
    divided by the steps the rollout serves.

    `state()` describes the data position before the current rollout when it is partly
    trained on: a resumed run draws that rollout again (the same prompts, sampled afresh)
    and trains on it from its first step.
    """

    def __init__(self, draw: Callable[[], tuple[Any, dict[str, float]]], order: Any, epochs: int, minibatches: int, seed: int):
        if epochs < 1 or minibatches < 1:
            raise PrefError(f"epochs and mini-batches per batch must be at least 1, not {epochs} and {minibatches}")
        self.draw = draw
        self.order = order
        self.epochs = epochs
        self.minibatches = minibatches
        self.seed = seed
        self.rollouts = 0  # rollouts drawn so far
        self._queue: list[Minibatch] = []
        self._metrics: dict[str, float] = {}
        self._state_before: dict[str, Any] = {}  # state() while part-way through a rollout

    def next(self) -> tuple[Minibatch, dict[str, float]]:
        if not self._queue:
            self._state_before = self.state()
            batch, metrics = self.draw()
            self._queue = self._split(Rollout(batch), len(batch))
            self.rollouts += 1
            # the rollout's time shared by the steps it serves: their sum is the time taken, and each step shows its part
            self._metrics = {key: value / len(self._queue) if key.startswith("time/") else value for key, value in metrics.items()}
        return self._queue.pop(0), dict(self._metrics)

    def _split(self, rollout: Rollout, rows: int) -> list[Minibatch]:
        if rows < self.minibatches:
            raise PrefError(f"a rollout of {rows} samples cannot be cut into {self.minibatches} mini-batches; lower the mini-batches or raise the batch size")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollouts)
        steps = []
        for epoch in range(self.epochs):
            order = torch.randperm(rows, generator=generator)
            for index, part in enumerate(torch.tensor_split(order, self.minibatches)):
                steps.append(Minibatch(rollout, part, epoch, index))
        return steps

    def state(self) -> dict[str, Any]:
        return dict(self._state_before) if self._queue else {**self.order.state(), "rollouts": self.rollouts}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rollouts = state.get("rollouts", 0)
        self._queue = []
        self.order.load_state({key: value for key, value in state.items() if key != "rollouts"})


def dataset_names(entries: Sequence[str]) -> list[str]:
    """Short metric-friendly names for `--dataset` entries: `data/easy.txt` -> `easy`; repeats get `-2`, `-3`."""
    names: list[str] = []
    for entry in entries:
        base = os.path.splitext(os.path.basename(os.path.normpath(entry)))[0] or entry
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


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


def build_datasets(builders: list[Any], policy: Policy, built: list[list[Any] | None] | None = None) -> list[list[Any] | None]:
    """Each builder's records, those already in `built` kept; None for a builder that used the policy's model
    before it loaded (one that samples its data: it is built again once the model has loaded)."""
    records = list(built or [None] * len(builders))
    for i, builder in enumerate(builders):
        if records[i] is None:
            try:
                records[i] = builder.build(policy)
            except ModelNotLoaded:
                pass
    return records


#: The records the batches of an offline objective are made of, by what it learns from (see `collate`).
BATCHED = {PAIRS: (PreferenceExample,), SETS: (LabeledExample, ConversationExample)}


def check_records(needs: ObjectiveNeeds, name: str, records: list[Any], entry: str) -> None:
    """A `PrefError` when a record of the dataset `entry` is none that offline objective `name` (of `needs`) makes batches of."""
    wanted = BATCHED.get(needs.data, ())
    odd = next((record for record in records if not isinstance(record, wanted)), None)
    if odd is not None:
        kinds = " or ".join(kind.__name__ for kind in wanted)
        raise PrefError(f"--dataset {entry} gives {type(odd).__name__} records, and objective {name!r} learns from {needs.data} "
                        f"({kinds}, as the {needs.dataset_builder} builder reads them): give such a dataset")


def split_datasets(records: list[list[Any]], trains: int, fraction: float, seed: int) -> tuple[list[list[Any]], list[Any]]:
    """(training sets, validation records): the first `trains` lists of `records`, `fraction` of each held out, and the held-out
    records followed by the rest (the --validation-dataset entries')."""
    example_sets, validation = hold_out(records[:trains], fraction, seed)
    return example_sets, validation + [example for examples in records[trains:] for example in examples]
