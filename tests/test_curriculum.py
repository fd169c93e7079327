"""The automatic curriculum: the weight update by hand, seeded and resumable draws, and runs where it steers."""

import json
import os
import random

import pytest
import torch
from torch.testing import assert_close

from pref.config import build_config
from pref.data import dataset_names
from pref.plan import resolve_plan
from pref.plugins.curriculum import Curriculum, CurriculumOptions, CurriculumSampler, update_weights
from pref.errors import PrefError
from pref.examples import TextExample
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource
from pref.policy import HFPolicy
from pref.registry import Registry, get_plugin_manager, load_registry
import pref.train as train_module
from pref.train import train

EASY = "the cat is on the mat . the cat is on the mat . the cat is on the mat ."


def gibberish(tokenizer, count, words=16, seed=0):
    """Random words of the tiny vocabulary: text no model predicts well."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha())
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(count)]


# -- the update rule --------------------------------------------------------------------------------


def test_update_weights_by_hand():
    """d = [1, 2, 5] -> shares [0.125, 0.25, 0.625]; v = [0, 1, 3] -> shares [0, 0.25, 0.75]; lambda = 1:

    m = ([0.125, 0.25, 0.625] + [0, 0.25, 0.75]) / 2 = [0.0625, 0.25, 0.6875]
    g = m - 1/3                                       = [-0.270833, -0.083333, 0.354167]
    eta = 1, w = [0.5, 0.3, 0.2]: w + g = [0.229167, 0.216667, 0.554167] (sums to 1: nothing to clip)
    """
    d, v = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 3.0])
    new = update_weights(torch.tensor([0.5, 0.3, 0.2]), d, v, eta=1.0, variance_weight=1.0)
    assert_close(new, torch.tensor([0.229167, 0.216667, 0.554167]), atol=1e-6, rtol=0)


def test_update_weights_clips_at_zero_and_renormalizes():
    """Same metric, w = [0.1, 0.3, 0.6]: w + g = [-0.170833, 0.216667, 0.954167]
    -> clipped [0, 0.216667, 0.954167], sum 1.170833 -> [0, 0.185053, 0.814947].
    """
    d, v = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 3.0])
    new = update_weights(torch.tensor([0.1, 0.3, 0.6]), d, v, eta=1.0, variance_weight=1.0)
    assert_close(new, torch.tensor([0.0, 0.185053, 0.814947]), atol=1e-6, rtol=0)


def test_update_weights_without_variance_and_with_equal_datasets():
    """lambda = 0, d = [2, 6]: m = [0.25, 0.75], g = [-0.25, 0.25]; eta = 0.5 -> [0.375, 0.625].
    Equal difficulties and variances give g = 0: the weights stay.
    """
    new = update_weights(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 6.0]), torch.tensor([0.0, 0.0]), eta=0.5, variance_weight=0.0)
    assert_close(new, torch.tensor([0.375, 0.625]))
    same = update_weights(torch.tensor([0.7, 0.3]), torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0]), eta=1.0, variance_weight=0.5)
    assert_close(same, torch.tensor([0.7, 0.3]))


def test_options_are_checked(tmp_path):
    assert CurriculumOptions.from_dict({"eta": 1, "every": 3}) == CurriculumOptions(eta=1.0, every=3)
    with pytest.raises(PrefError, match="unknown curriculum option 'etta': did you mean 'eta'"):
        CurriculumOptions.from_dict({"etta": 0.1})
    with pytest.raises(PrefError, match="every must be a whole number"):
        CurriculumOptions.from_dict({"every": 2.5})
    with pytest.raises(PrefError, match="refresh must be at least 1"):
        CurriculumOptions.from_dict({"refresh": 0})
    with pytest.raises(PrefError, match="must not be negative"):
        CurriculumOptions.from_dict({"eta": -1})
    with pytest.raises(PrefError, match="two or more --dataset"):
        build_config(flags={"dataset": ["a.txt"], "curriculum": True})
    # --curriculum is the sampler "curriculum": the plan builds it, so a bad option fails before the model loads
    files = two_files(tmp_path)
    config = build_config(flags={"objective": "dpo", "dataset": files, "curriculum": True, "curriculum_options": {"speed": 1}})
    with pytest.raises(PrefError, match="unknown option for sampler 'curriculum': 'speed'"):
        resolve_plan(config, load_registry())
    config = build_config(flags={"objective": "dpo", "dataset": files, "curriculum": True, "curriculum_options": {"every": 0}})
    with pytest.raises(PrefError, match="every must be at least 1"):
        resolve_plan(config, load_registry())
    with pytest.raises(PrefError, match="not both"):
        build_config(flags={"dataset": ["a.txt", "b.txt"], "curriculum": True, "sampler": "curriculum"})


def two_files(folder):
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("one line\n")
    return [str(folder / "a.txt"), str(folder / "b.txt")]


def test_curriculum_is_the_registered_sampler_curriculum(tmp_path):
    files = two_files(tmp_path)
    plan = resolve_plan(build_config(flags={"objective": "dpo", "dataset": files, "curriculum": True,
                                            "curriculum_options": {"eta": 0.3}}), load_registry())
    assert isinstance(plan.sampler, CurriculumSampler) and plan.sampler.options == CurriculumOptions(eta=0.3)
    assert load_registry().get("sampler", "curriculum").plugin == "curriculum"
    plain = resolve_plan(build_config(flags={"objective": "dpo", "dataset": files[:1]}), load_registry())
    assert not isinstance(plain.sampler, CurriculumSampler)  # the default: length-buckets (tests/test_bucketing.py)


def test_dataset_names_are_short_and_distinct():
    assert dataset_names(["data/easy.txt", "hard.jsonl", "org/wikitext", "other/easy.csv"]) == ["easy", "hard", "wikitext", "easy-2"]


# -- drawing ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return HFPolicy.load(tiny_model_dir)


def records(prefix, count):
    return [TextExample(f" {prefix} {i}", prompt="say") for i in range(count)]


def test_draws_are_seeded_resumable_and_shared_across_processes(policy):
    datasets = {"a": records("cat", 5), "b": records("dog", 7)}
    options = CurriculumOptions(every=2, sample_size=3)
    whole = Curriculum(datasets, policy, 3, seed=4, options=options)
    batches = [whole.next() for _ in range(6)]
    assert all(len(b) == 3 for b in batches)
    assert {r.text.split()[0] for b in batches for r in b} == {"cat", "dog"}

    first = Curriculum(datasets, policy, 3, seed=4, options=options)
    for _ in range(3):
        first.next()
    state = json.loads(json.dumps(first.state()))  # it goes into state.json
    resumed = Curriculum(datasets, policy, 3, seed=4, options=options)
    resumed.load_state(state)
    assert [resumed.next() for _ in range(3)] == batches[3:]
    assert resumed.metrics() == whole.metrics()

    # two processes of batch 3 share one global batch of 6: each takes its half
    ranks = [Curriculum(datasets, policy, 3, seed=4, rank=r, world=2, options=options) for r in range(2)]
    single = Curriculum(datasets, policy, 6, seed=4, options=options)
    for _ in range(3):
        assert ranks[0].next() + ranks[1].next() == single.next()


def test_a_weight_of_zero_is_never_drawn_and_names_must_match_on_resume(policy):
    curriculum = Curriculum({"a": records("cat", 4), "b": records("dog", 4)}, policy, 4, seed=0)
    curriculum.next()
    curriculum.weights = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert all(r.text.startswith(" cat") for _ in range(5) for r in curriculum.next())
    other = Curriculum({"a": records("cat", 4), "c": records("dog", 4)}, policy, 4, seed=0)
    with pytest.raises(PrefError, match="curriculum datasets"):
        other.load_state(curriculum.state())


def test_difficulty_is_the_frozen_copys_nll_and_refresh_copies_the_policy(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)  # its own: this test changes the weights
    hard = [TextExample(" " + t) for t in gibberish(policy.tokenizer, 8)]
    easy = [TextExample(" " + EASY)] * 8
    curriculum = Curriculum({"easy": easy, "hard": hard}, policy, 2, seed=0, options=CurriculumOptions(every=1, refresh=1, eta=0.5))
    curriculum.next()  # the first draw scores both datasets, without moving the weights
    metrics = curriculum.metrics()
    assert metrics["curriculum/difficulty/hard"] > metrics["curriculum/difficulty/easy"] + 1.0
    assert metrics["curriculum/variance/hard"] > metrics["curriculum/variance/easy"] == 0.0
    assert metrics["curriculum/weight/hard"] == metrics["curriculum/weight/easy"] == 0.5
    curriculum.next()
    assert curriculum.metrics()["curriculum/weight/hard"] > 0.6
    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)  # training moves the policy; the frozen copy stays
    frozen, current = next(curriculum.frozen.parameters()), next(policy.model.parameters())
    assert not torch.equal(frozen, current)
    curriculum.refresh()
    assert torch.equal(frozen, current)


# -- whole runs -----------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def logged(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def easy_and_hard_pairs(folder, tokenizer):
    """Easy: repetitive answers the tiny model predicts well; hard: random words."""
    words = gibberish(tokenizer, 24, seed=1)
    easy = write_jsonl(folder / "easy.jsonl", [{"prompt": "Say it again.", "chosen": EASY, "rejected": "the mat ."}] * 12)
    hard = write_jsonl(folder / "hard.jsonl", [{"prompt": "Say anything.", "chosen": words[2 * i], "rejected": words[2 * i + 1]} for i in range(12)])
    return [easy, hard]


def dpo_config(folder, model, datasets, name="run", **flags):
    return build_config(flags={
        "objective": "dpo", "model": model, "dataset": datasets, "curriculum": True, "device": "cpu",
        "curriculum_options": {"every": 2, "eta": 0.3, "sample_size": 8}, "steps": 8, "batch_size": 2,
        "output_dir": str(folder / name), **flags,
    })


def test_a_much_harder_dataset_gains_weight_in_a_dpo_run(tmp_path, tiny_model_dir, policy):
    """The weights move at steps 3, 5 and 7 (after every 2 steps), each time towards the hard dataset."""
    config = dpo_config(tmp_path, tiny_model_dir, easy_and_hard_pairs(tmp_path, policy.tokenizer))
    lines = logged(train(config, load_registry()))
    first, last = lines[0], lines[-1]
    assert first["curriculum/weight/hard"] == first["curriculum/weight/easy"] == 0.5
    assert first["curriculum/difficulty/hard"] > first["curriculum/difficulty/easy"]
    assert last["curriculum/weight/hard"] > first["curriculum/weight/hard"] + 0.1
    assert abs(last["curriculum/weight/hard"] + last["curriculum/weight/easy"] - 1.0) < 1e-6
    rises = [b["curriculum/weight/hard"] - a["curriculum/weight/hard"] for a, b in zip(lines, lines[1:])]
    assert [step for step, rise in zip(range(2, 9), rises) if rise > 0] == [3, 5, 7]



def test_an_interrupted_curriculum_run_resumes_exactly(tmp_path, tiny_model_dir, policy, monkeypatch, interrupted_after):
    """Checkpoints on refresh steps: the resumed run's frozen copy is the one an uninterrupted run has."""
    datasets = easy_and_hard_pairs(tmp_path, policy.tokenizer)
    flags = {"steps": 6, "save_every": 2, "eval_every": 2, "validation_split": 0.2,
             "curriculum_options": {"every": 1, "refresh": 2, "eta": 0.3, "sample_size": 4}}
    whole = logged(train(dpo_config(tmp_path, tiny_model_dir, datasets, "whole", **flags), load_registry()))

    with interrupted_after(3):
        train(dpo_config(tmp_path, tiny_model_dir, datasets, "broken", **flags), load_registry())
    broken = str(tmp_path / "broken")
    train(dpo_config(tmp_path, tiny_model_dir, datasets, "broken", resume=broken, **flags), load_registry())
    resumed = logged(broken)
    # the resume cut the log back to the checkpoint (step 2): no step is logged twice
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for expected, got in zip(whole[2:], resumed[2:]):
        for key in expected:
            if key.startswith(("curriculum/", "validation/", "loss")):
                assert got[key] == pytest.approx(expected[key], abs=1e-6), (expected["step"], key)
    assert json.load(open(tmp_path / "whole" / "best.json")) == json.load(open(os.path.join(broken, "best.json")))


class LongerIsBetter(RewardSource):
    """Reward = answer length: pools of different answers always give a pair."""

    def score(self, prompts, completions):
        return {"reward": torch.tensor([float(len(c)) for c in completions])}


class LongerPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("longer", LongerIsBetter)


def test_online_run_samples_from_the_text_datasets_prefixes(tmp_path, tiny_model_dir, policy, monkeypatch):
    easy = tmp_path / "easy.txt"
    easy.write_text((EASY + "\n") * 6)
    hard = tmp_path / "hard.txt"
    hard.write_text("\n".join(gibberish(policy.tokenizer, 6)) + "\n")
    pm, failures, sources = get_plugin_manager()
    pm.register(LongerPlugin(), name="test-longer")
    prompts_seen = []
    sample = HFPolicy.sample

    def recording(self, prompts, k, sampling):
        prompts_seen.extend(prompts)
        return sample(self, prompts, k, sampling)

    monkeypatch.setattr(HFPolicy, "sample", recording)
    config = build_config(flags={
        "objective": "online-dpo", "reward": "longer", "model": tiny_model_dir, "dataset": [str(easy), str(hard)],
        "curriculum": True, "curriculum_options": {"every": 1, "sample_size": 4}, "steps": 2, "batch_size": 2,
        "samples_per_prompt": 2, "max_new_tokens": 4, "device": "cpu", "output_dir": str(tmp_path / "run"),
    })
    lines = logged(train(config, Registry(pm, failures, sources)))
    assert {"curriculum/weight/easy", "curriculum/weight/hard", "curriculum/difficulty/hard", "reward/mean"} <= set(lines[-1])
    starts = {" ".join(EASY.split()[:8])} | {" ".join(t.split()[:8]) for t in hard.read_text().splitlines()}
    assert prompts_seen and set(prompts_seen) <= starts  # the prompts are the texts' first 8 words


# -- another sampler, from a plugin ---------------------------------------------------------------------


class FirstDatasetOnly:
    """Records of the first dataset only, in order: a sampler a third-party package could register."""

    def __init__(self, repeat=1):
        self.repeat = repeat

    def build(self, datasets, policy, batch_size, seed, rank, world, batches_per_step):
        return FirstDatasetOrder(next(iter(datasets.values())), batch_size * self.repeat)


class FirstDatasetOrder:
    def __init__(self, records, batch_size):
        self.records, self.batch_size, self.draws = records, batch_size, 0

    def next(self):
        start = self.draws * self.batch_size
        self.draws += 1
        return [self.records[(start + i) % len(self.records)] for i in range(self.batch_size)]

    def state(self):
        return {"draws": self.draws}

    def load_state(self, state):
        self.draws = state["draws"]

    def metrics(self):
        return {"sampler/draws": float(self.draws)}


class FirstDatasetPlugin:
    @hookimpl
    def register_samplers(register):
        register("first-only", FirstDatasetOnly)


def test_a_plugin_sampler_chooses_the_records(tmp_path, tiny_model_dir, policy, monkeypatch):
    """--sampler first-only: every batch comes from the easy dataset, and the sampler's metrics are logged."""
    pm, failures, sources = get_plugin_manager()
    pm.register(FirstDatasetPlugin, name="first-dataset-plugin")
    datasets = easy_and_hard_pairs(tmp_path, policy.tokenizer)
    seen = []
    original = train_module.build_data

    def recording(config, plan, policy, examples, rank, world, order=None, *args, **kwargs):
        seen.append(order)
        return original(config, plan, policy, examples, rank, world, order, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_data", recording)
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": datasets, "sampler": "first-only",
                                 "sampler_options": {"repeat": 1}, "steps": 3, "batch_size": 2, "device": "cpu",
                                 "output_dir": str(tmp_path / "run")})
    lines = logged(train(config, Registry(pm, failures, sources)))
    [order] = seen
    assert isinstance(order, FirstDatasetOrder) and order.draws == 3
    assert all(r.chosen == EASY for r in order.records)
    assert [m["sampler/draws"] for m in lines] == [1.0, 2.0, 3.0]
    with pytest.raises(PrefError, match="unknown option for sampler 'first-only'"):
        resolve_plan(build_config(flags={"objective": "dpo", "dataset": datasets, "sampler": "first-only", "sampler_options": {"again": 2}}),
                     Registry(pm, failures, sources))
