"""Length-bucketed batches: every row once per epoch, similar lengths together, seeded, shared and resumable."""

import json
import os
import random

import pytest

from pref.bucketing import LengthBucketedBatches
from pref.config import build_config
from pref.data import ShuffledBatches
from pref.registry import load_registry
from pref.train import train

RNG = random.Random(0)
LENGTHS = [RNG.randint(16, 256) for _ in range(103)]
ITEMS = list(range(len(LENGTHS)))


def draw(batches, n):
    return [batches.next() for _ in range(n)]


def padded(batch_list):
    """Positions a forward pass computes: each batch padded to its longest row."""
    return sum(len(b) * max(LENGTHS[i] for i in b) for b in batch_list)


def test_each_epoch_holds_every_row_once():
    batches = LengthBucketedBatches(ITEMS, LENGTHS, batch_size=4, seed=0, window=5)
    rows = [i for b in draw(batches, 60) for i in b]  # 240 rows: two whole epochs and part of a third
    assert sorted(rows[:103]) == ITEMS and sorted(rows[103:206]) == ITEMS


def test_similar_lengths_share_a_batch_so_less_is_padding():
    bucketed = draw(LengthBucketedBatches(ITEMS, LENGTHS, 4, seed=0, window=5), 25)
    shuffled = draw(ShuffledBatches(ITEMS, 4, seed=0), 25)
    assert padded(bucketed) < 0.8 * padded(shuffled)


def test_the_order_follows_the_seed():
    a = draw(LengthBucketedBatches(ITEMS, LENGTHS, 4, seed=1), 30)
    assert a == draw(LengthBucketedBatches(ITEMS, LENGTHS, 4, seed=1), 30)
    assert a != draw(LengthBucketedBatches(ITEMS, LENGTHS, 4, seed=2), 30)


def test_processes_take_equal_shares_of_the_same_global_batches():
    whole = draw(LengthBucketedBatches(ITEMS, LENGTHS, 6, seed=0, window=3), 40)  # crosses epoch boundaries
    shares = [draw(LengthBucketedBatches(ITEMS, LENGTHS, 3, seed=0, rank=r, world=2, window=3), 40) for r in (0, 1)]
    assert all(len(b) == 3 for share in shares for b in share)
    assert [a + b for a, b in zip(*shares)] == whole


@pytest.mark.parametrize("done", [0, 7, 26, 51])
def test_resuming_from_state_continues_exactly(done):
    first = LengthBucketedBatches(ITEMS, LENGTHS, 4, seed=3, window=4)
    draw(first, done)
    state = json.loads(json.dumps(first.state()))
    again = LengthBucketedBatches(ITEMS, LENGTHS, 4, seed=3, window=4)
    again.load_state(state)
    assert draw(again, 30) == draw(first, 30)


def test_a_run_logs_its_padding_share_and_tokens_per_second(tmp_path, tiny_model_dir, prefs_file):
    def run(name, **flags):
        config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "output_dir": str(tmp_path / name),
                                     "batch_size": 2, "steps": 3, "device": "cpu", **flags})
        out = train(config, load_registry())
        return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]

    bucketed, plain = run("bucketed"), run("plain", bucket_window=0)
    for lines in (bucketed, plain):
        assert all(0 <= m["tokens/padding_fraction"] < 1 and m["tokens/per_second"] > 0 for m in lines)
    assert sum(m["tokens/padding_fraction"] for m in bucketed) < sum(m["tokens/padding_fraction"] for m in plain)
