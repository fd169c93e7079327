"""The `length-buckets` sampler: batches of rows of similar length, so little of a forward pass goes to padding.

A built-in plugin of the sampler kind (`register_samplers`, see docs/plugins.md), and
the default sampler of offline objectives: the plan picks it with `window` set to
`--bucket-window` (0: none, records are plainly shuffled).

`LengthBucketedBatches` is a `ShuffledBatches` whose epoch order keeps rows of similar
length together: shuffle, cut into windows of `window` global batches, sort each window
by length, cut it into global batches, shuffle the batches. It is drawn, shared between
processes and resumed exactly like `ShuffledBatches` (same `state()`), and depends only
on the seed, the epoch and the lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pref.data import ShuffledBatches
from pref.errors import PrefError
from pref.hookspecs import hookimpl

#: Global batches per window that are sorted by length together: wide enough that most
#: batches hold rows of near-equal length, narrow enough that the order stays random.
DEFAULT_WINDOW = 50


def example_length(tokenizer: Any, example: Any) -> int:
    """An example's length in tokens: its prompt plus its longest answer (a sort key, not an exact row width)."""
    prompt = getattr(example, "prompt", "")
    if not isinstance(prompt, str):
        prompt = "\n".join(m.get("content", "") for m in prompt)
    answers = [getattr(example, name) for name in ("chosen", "rejected", "completion", "text") if isinstance(getattr(example, name, None), str)]
    texts = [prompt, *answers]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return counts[0] + max(counts[1:], default=0)


class LengthBucketedBatches(ShuffledBatches):
    """Endless batches over `items` (with token `lengths`), each global batch of similar-length rows.

    A global batch is `batch_size * world` rows; process `rank` takes its `batch_size` slice.
    Rows a previous epoch left in a part-filled batch are completed by the first rows of the
    next epoch's shuffle, so every later batch still starts on a batch boundary.
    """

    def __init__(self, items: Sequence[Any], lengths: Sequence[int], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 window: int = DEFAULT_WINDOW):
        if len(lengths) != len(items):
            raise ValueError("one length per item")
        self.lengths = list(lengths)
        self.window = window
        super().__init__(items, batch_size, seed, rank, world)

    def _shuffle(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.items), generator=generator).tolist()
        size = self.batch_size * self.world
        lead = -(epoch * len(self.items)) % size  # rows that complete the batch the last epoch began
        head, rest = order[:lead], order[lead:]
        batches = []
        for start in range(0, len(rest), self.window * size):
            window = sorted(rest[start : start + self.window * size], key=lambda i: self.lengths[i])
            batches += [window[j : j + size] for j in range(0, len(window), size)]
        tail = batches.pop() if batches and len(batches[-1]) < size else []  # a part-filled batch goes last
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return head + [i for batch in shuffled for i in batch] + tail


class LengthBucketsSampler:
    """Batches of rows of similar length (less padding), sorted within windows of `window` global batches.

    Built while the run is planned (a bad window fails before the model loads);
    `build(...)` measures the records with the policy's tokenizer once they are read.
    """

    def __init__(self, window: int = DEFAULT_WINDOW):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise PrefError(f"length-buckets option window must be a whole number of batches, 1 or more, not {window!r}")
        self.window = window

    def build(self, datasets: dict[str, Sequence[Any]], policy: Any, batch_size: int, seed: int, rank: int = 0, world: int = 1,
              batches_per_step: float = 1) -> LengthBucketedBatches:
        """The order over every record of `datasets` (name -> records, taken in order, as one pool)."""
        records = [record for records in datasets.values() for record in records]
        lengths = [example_length(policy.tokenizer, record) for record in records]
        return LengthBucketedBatches(records, lengths, batch_size, seed, rank, world, self.window)


@hookimpl
def register_samplers(register):
    register("length-buckets", LengthBucketsSampler)
