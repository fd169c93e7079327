"""Length-bucketed batches: every row once per epoch, similar lengths together, seeded, shared and resumable;
the sampler `length-buckets`, which the plan picks for offline objectives (`--bucket-window`)."""

import json
import os
import random

import pytest

from pref.plugins.length_buckets import LengthBucketedBatches
from pref.config import build_config
from pref.data import ShuffledBatches
from pref.errors import PrefError
from pref.plan import resolve_plan
from pref.plugins.curriculum import CurriculumSampler
from pref.plugins.length_buckets import LengthBucketsSampler, example_length
from pref.policy import HFPolicy
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


def plan_sampler(**flags):
    return resolve_plan(build_config(flags=flags), load_registry()).sampler


def test_offline_objectives_get_the_length_buckets_sampler_by_default(prefs_file):
    assert load_registry().get("sampler", "length-buckets").builtin
    default = plan_sampler(objective="dpo", dataset=[prefs_file])
    assert isinstance(default, LengthBucketsSampler) and default.window == 50
    assert plan_sampler(objective="dpo", dataset=[prefs_file], bucket_window=7).window == 7
    assert plan_sampler(objective="dpo", dataset=[prefs_file], bucket_window=0) is None  # a plain shuffle
    assert plan_sampler(objective="divpo") is None  # online: prompts are not bucketed
    assert plan_sampler(objective="dpo", dataset=[prefs_file], sampler="length-buckets", sampler_options={"window": 3}).window == 3


def test_a_chosen_sampler_replaces_the_length_buckets(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for file in files:
        file.write_text("one line\n")
    assert isinstance(plan_sampler(objective="sft", dataset=[str(f) for f in files], curriculum=True), CurriculumSampler)


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_a_bad_window_is_a_one_line_error(prefs_file, window):
    with pytest.raises(PrefError, match="length-buckets option window must be a whole number"):
        plan_sampler(objective="dpo", dataset=[prefs_file], sampler="length-buckets", sampler_options={"window": window})


def test_the_sampler_orders_every_dataset_as_one_pool(tiny_model_dir, prefs_file):
    """Its order is `LengthBucketedBatches` over the records of all datasets in turn, measured by the policy's tokenizer."""
    from pref.plugins.preference_data import load_preferences

    policy = HFPolicy.load(tiny_model_dir)
    first, second = load_preferences(prefs_file)[:3], load_preferences(prefs_file)[3:]
    order = LengthBucketsSampler(window=2).build({"a": first, "b": second}, policy, batch_size=2, seed=5)
    records = first + second
    lengths = [example_length(policy.tokenizer, r) for r in records]
    expected = LengthBucketedBatches(records, lengths, 2, seed=5, window=2)
    assert draw(order, 9) == draw(expected, 9)


def test_tokens_are_counted_over_every_kind_of_training_batch():
    import torch

    from pref import LabeledBatch, Minibatch, PairBatch, Rollout, ScoredBatch, Sequences
    from pref.data import count_tokens

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # 3 real tokens in 6 positions
    rows = Sequences(torch.ones(2, 3, dtype=torch.long), mask, mask)
    assert count_tokens(rows) == (3, 6)
    assert count_tokens(PairBatch(rows, rows)) == (6, 12)
    assert count_tokens(LabeledBatch(rows, torch.tensor([True, False]))) == (3, 6)
    rollout = Rollout(ScoredBatch(["p", "p"], ["a", "b"], rows, {"reward": torch.zeros(2)}, 2))
    assert count_tokens(Minibatch(rollout, torch.tensor([1]))) == (1, 3)  # its own row of the rollout only
