"""The online path: sample K answers per prompt, score, select, train; redraws and resume.

Short runs use the tiny model; the rest uses a fake policy that answers
"<prompt> #<k>", so the prompt order and the draws can be read off directly.
"""

import json
import os

import pytest
import torch

from pref.config import build_config
from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import PairBatch, Policy, RewardSource, SamplingConfig
from pref.online import OnlineBatches
from pref.plugins.divpo import BestWorstSelector, DivPO, OnlineDPO
from pref.plugins.noun_diversity import NounDiversityReward
from pref.policy import HFPolicy
from pref.registry import Registry, get_plugin_manager, load_registry
from pref.sequences import Sequences
from pref.train import train

ONLINE_METRICS = {"reward/mean", "reward/std", "reward/max", "pairs/usable_fraction", "samples/distinct_ratio",
                  "samples/entropy", "samples/redraws", "time/sampling", "time/scoring", "time/update"}


def online_run(tmp_path, model, registry=None, name="run", **flags):
    config = build_config(flags={"model": model, "steps": 2, "batch_size": 2, "samples_per_prompt": 4, "max_new_tokens": 8,
                                 "device": "cpu", "output_dir": str(tmp_path / name), **flags})
    out = train(config, registry or load_registry())
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_divpo_run_with_the_default_noun_reward(tmp_path, tiny_model_dir):
    lines = online_run(tmp_path, tiny_model_dir, objective="divpo")
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert ONLINE_METRICS | {"pools/all_good", "pools/none_good", "pools/all_equal", "loss"} <= set(metrics)
        assert 0.0 <= metrics["reward/mean"] <= 1.0  # the noun reward is 0 or 1
        assert 0.0 < metrics["pairs/usable_fraction"] <= 1.0  # a batch needs at least one pair
        assert 0.0 < metrics["samples/distinct_ratio"] <= 1.0
        # each of the 2 prompts is paired or counted in at most one edge case
        edge_cases = metrics["pools/all_good"] + metrics["pools/none_good"] + metrics["pools/all_equal"]
        assert edge_cases <= 2
        assert metrics["pools/equal_quality"] == 0  # the noun reward's pass mark (0.5) is the threshold
        assert min(metrics["time/sampling"], metrics["time/scoring"], metrics["time/update"]) > 0.0


def test_online_sampling_takes_the_rewards_answer_length_and_the_runs_thread_count(tmp_path, tiny_model_dir):
    threads = torch.get_num_threads()
    try:
        online_run(tmp_path, tiny_model_dir, name="reward's", objective="divpo", max_new_tokens=None, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    online_run(tmp_path, tiny_model_dir, name="run's", objective="divpo", max_new_tokens=6)
    lengths = [json.load(open(tmp_path / name / "run.json"))["config"]["max_new_tokens"] for name in ("reward's", "run's")]
    assert lengths == [NounDiversityReward.max_new_tokens, 6] == [8, 6]
    # the objective's default reward is recorded by name, and the model card names it (it was `reward: null`)
    assert json.load(open(tmp_path / "run's" / "run.json"))["config"]["reward"] == "noun-diversity"
    assert "- reward: `noun-diversity`" in (tmp_path / "run's" / "final" / "README.md").read_text()


def test_online_dpo_run_with_the_noun_reward(tmp_path, tiny_model_dir):
    lines = online_run(tmp_path, tiny_model_dir, objective="online-dpo", reward="noun-diversity")
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert ONLINE_METRICS | {"pools/all_equal", "loss"} <= set(metrics)
        # best vs worst needs a pool with a noun and a non-noun, so some reward was earned
        assert metrics["reward/max"] == 1.0 and 0.0 < metrics["pairs/usable_fraction"] <= 1.0


def test_all_samples_of_a_draw_come_from_one_generate_call(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    calls = []
    sample = policy.sample

    def spy(prompts, k, sampling):
        calls.append((len(prompts), k))
        return sample(prompts, k, sampling)

    policy.sample = spy
    objective = DivPO()
    data = OnlineBatches(policy, NounDiversityReward.default_prompts, Indexed(), objective.default_selector(), objective.needs, 4,
                         SamplingConfig(max_new_tokens=4), prompts_per_step=3, seed=0)
    batch, metrics = data.next()
    assert calls == [(3, 4)]
    assert isinstance(batch, PairBatch) and len(batch) == 3  # every pool has distinct rewards, so one pair per prompt
    assert metrics["samples/redraws"] == 0.0 and metrics["pairs/usable_fraction"] == 1.0


def test_greedy_generation_of_several_answers_repeats_the_one_greedy_answer(tiny_model_dir):
    # `pref generate -n 3` at its default temperature 0: transformers refuses K greedy sequences
    policy = HFPolicy.load(tiny_model_dir)
    prompts = ["What is your name?", "Name a fruit."]
    one = policy.generate(prompts, 1, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert policy.generate(prompts, 3, SamplingConfig(max_new_tokens=6, temperature=0.0)) == [answers * 3 for answers in one]


# -- a fake policy, throw-away rewards ------------------------------------------------------------


class EchoPolicy(Policy):
    """Answers "<prompt> #<k>"; `encode` gives each character's code as a token, so batches can be read back (`texts`)."""

    model = None
    tokenizer = None

    def __init__(self):
        self.calls = []

    def generate(self, prompts, k, sampling):
        self.calls.append(list(prompts))
        return [[f"{prompt} #{i}" for i in range(k)] for prompt in prompts]

    def encode(self, prompts, completions, max_prompt_length=None):
        rows = [[ord(c) for c in p + a] for p, a in zip(prompts, completions)]
        masks = [[0] * len(p) + [1] * len(a) for p, a in zip(prompts, completions)]
        width = max(map(len, rows))
        return Sequences(*(torch.tensor([r + [0] * (width - len(r)) for r in m]) for m in (rows, [[1] * len(r) for r in rows], masks)))

    def logps(self, sequences, with_logits=False, temperature=1.0):
        raise AssertionError("best-vs-worst needs no log-probs")

    def save(self, path):
        raise AssertionError("not saved")


def texts(sequences):
    """(prompt, completion) of each row `EchoPolicy.encode` made."""
    rows = zip(sequences.input_ids.tolist(), sequences.attention_mask.tolist(), sequences.completion_mask.tolist())
    return [("".join(chr(t) for t, a, c in zip(*row) if a and not c), "".join(chr(t) for t, _, c in zip(*row) if c)) for row in rows]


class Indexed(RewardSource):
    """Reward = position of the completion in the call: every pool has a best and a worst."""

    def score(self, prompts, completions):
        return {"reward": torch.arange(len(completions), dtype=torch.float32)}


class Constant(RewardSource):
    """The same reward for everything: best vs worst never finds a pair."""

    default_prompts = ["Say one word.", "Say another word."]

    def score(self, prompts, completions):
        return {"reward": torch.zeros(len(completions))}


class ConstantFirst(RewardSource):
    """Constant on the first call, then `Indexed`: the first draw has no usable pair."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions):
        self.calls += 1
        return (Constant() if self.calls == 1 else Indexed()).score(prompts, completions)


PROMPTS = [f"prompt {i}" for i in range(7)]


def echo_batches(reward, seed=5, prompts_per_step=3):
    return OnlineBatches(EchoPolicy(), PROMPTS, reward, BestWorstSelector(), OnlineDPO.needs, 2, SamplingConfig(), prompts_per_step, seed)


def test_a_draw_without_pairs_is_replaced_by_the_next_prompts():
    data = echo_batches(ConstantFirst())
    batch, metrics = data.next()
    first, second = data.policy.calls
    assert set(first).isdisjoint(second)  # the second draw moved on through the shuffled prompts
    assert metrics["samples/redraws"] == 1.0
    # reward = position: in each pool of 2 the second answer is best
    assert texts(batch.chosen) == [(p, f"{p} #1") for p in second] and texts(batch.rejected) == [(p, f"{p} #0") for p in second]


@pytest.mark.parametrize("together", [False, True])
def test_sampling_together_every_process_draws_while_one_draws_again(together):
    """A sharded model samples collectively: the process whose first draw had a pair draws along while the other draws again
    (dropping its extra draw), or the other's weight gathers would wait forever; unsharded, it goes on alone."""
    from test_group_processes import in_two_processes  # tests/ is on sys.path

    def work(processes):
        reward = ConstantFirst() if processes.rank == 0 else Indexed()
        data = OnlineBatches(EchoPolicy(), PROMPTS, reward, BestWorstSelector(), OnlineDPO.needs, 2, SamplingConfig(), 2, 5,
                             processes.rank, 2, processes=processes, sampling_together=together)
        batch, metrics = data.next()
        return data.policy.calls, texts(batch.chosen), metrics["samples/redraws"]

    (calls0, chosen0, redraws0), (calls1, chosen1, redraws1) = in_two_processes(work)
    assert (len(calls0), redraws0, redraws1) == (2, 1.0, 0.0)
    assert len(calls1) == (2 if together else 1)
    assert chosen1 == [(p, f"{p} #1") for p in calls1[0]]  # the batch of its own first draw, kept
    assert chosen0 == [(p, f"{p} #1") for p in calls0[1]]


def test_a_reward_that_never_yields_a_pair_fails_after_max_draws(tmp_path, tiny_model_dir, monkeypatch):
    registry = registry_with_reward("constant", Constant)

    calls = []
    sample = HFPolicy.sample

    def counting(self, prompts, k, sampling):
        calls.append(len(prompts))
        return sample(self, prompts, k, sampling)

    monkeypatch.setattr(HFPolicy, "sample", counting)
    monkeypatch.setattr(OnlineBatches, "MAX_DRAWS", 3)
    with pytest.raises(PrefError, match="no usable pair in 3 draws"):
        online_run(tmp_path, tiny_model_dir, registry, objective="online-dpo", reward="constant")
    assert calls == [2, 2, 2]


class IndexedThenConstant(Constant):
    """`Indexed` on the first call, then `Constant`: the first step's samples get distinct rewards; from then
    on every sample earns the same, as when online DPO's policy answers validly every time: nothing is left to learn."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions):
        self.calls += 1
        return (Indexed() if self.calls == 1 else Constant()).score(prompts, completions)


def registry_with_reward(name, reward_class):
    """pref's own plugins and one more reward, registered as a third-party plugin would."""

    class Plugin:
        @hookimpl
        def register_rewards(self, register):
            register(name, reward_class)

    pm, failures, sources = get_plugin_manager()
    pm.register(Plugin(), name=f"test-{name}")
    return Registry(pm, failures, sources)


@pytest.fixture
def stopping_registry(monkeypatch):
    """A registry with the reward `indexed-then-constant`: an online-dpo run on it stops early, after step 1."""

    monkeypatch.setattr(OnlineBatches, "MAX_DRAWS", 2)
    return registry_with_reward("indexed-then-constant", IndexedThenConstant)


@pytest.mark.parametrize("log_every", [1, 2])  # 2: step 1 is logged all the same, as the last step done
def test_a_run_whose_samples_stop_giving_pairs_stops_early_and_keeps_the_model(tmp_path, tiny_model_dir, stopping_registry, log_every):
    lines = online_run(tmp_path, tiny_model_dir, stopping_registry, objective="online-dpo", reward="indexed-then-constant", steps=3,
                       log_every=log_every)
    assert [m["step"] for m in lines] == [1]
    assert os.path.exists(tmp_path / "run" / "final" / "config.json")
    assert "- steps: 3 (stopped after 1)," in (tmp_path / "run" / "final" / "README.md").read_text()


@pytest.mark.parametrize("log_every, eval_every", [(1, 0), (2, 0), (1, 1)])
def test_a_run_that_stops_early_evaluates_the_model_it_ends_with(tmp_path, tiny_model_dir, stopping_registry, log_every, eval_every):
    # log_every 1: step 1's line was logged, the figures come as one more line for step 1; 2: they join step 1's line;
    # eval_every 1: step 1 was evaluated already, and is not again
    held = tmp_path / "held.txt"
    held.write_text("the sky is blue and the sea is green .\n")
    lines = online_run(tmp_path, tiny_model_dir, stopping_registry, objective="online-dpo", reward="indexed-then-constant", steps=3,
                       log_every=log_every, eval_every=eval_every, validation_dataset=[str(held)], test_prompts=["Name a fruit."])
    run = tmp_path / "run"
    assert [(m["step"], "loss" in m, "validation/loss" in m) for m in lines] == (
        [(1, True, False), (1, False, True)] if (log_every, eval_every) == (1, 0) else [(1, True, True)])
    assert [json.loads(line)["step"] for line in open(run / "generations.jsonl")] == [1]
    best = json.load(open(run / "best.json"))
    assert best["step"] == 1 and best["validation_loss"] == lines[-1]["validation/loss"]
    assert os.path.exists(run / "best" / "config.json")
    assert f"| `validation/loss` | {lines[-1]['validation/loss']:.4g} | 1 |" in (run / "final" / "README.md").read_text()


def test_a_resumed_run_that_stops_early_evaluates_its_own_last_step(tmp_path, tiny_model_dir, stopping_registry):
    # the first run stops after step 1 with a checkpoint there; the resumed one (a fresh reward: pairs once more) after step 2
    held = tmp_path / "held.txt"
    held.write_text("the sky is blue and the sea is green .\n")
    flags = {"objective": "online-dpo", "reward": "indexed-then-constant", "steps": 3, "save_every": 1, "validation_dataset": [str(held)],
             "test_prompts": ["Name a fruit."]}
    online_run(tmp_path, tiny_model_dir, stopping_registry, **flags)
    lines = online_run(tmp_path, tiny_model_dir, stopping_registry, resume=str(tmp_path / "run"), **flags)
    assert [(m["step"], "validation/loss" in m) for m in lines] == [(1, False), (1, True), (2, False), (2, True)]
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "generations.jsonl")] == [1, 2]
    best = json.load(open(tmp_path / "run" / "best.json"))
    assert best["validation_loss"] == min(lines[1]["validation/loss"], lines[3]["validation/loss"])


@pytest.mark.parametrize("eval_every, killed", [(1, False), (0, True)])
def test_a_run_resumed_where_no_pair_is_left_stops_early_as_the_uninterrupted_run_did(tmp_path, tiny_model_dir, stopping_registry, eval_every,
                                                                                       killed):
    # the run stopped after step 1, its checkpoint; resumed, step 2 has no pair again: the resumed run stops as the uninterrupted
    # one did, rather than fail as a reward that never gives a pair, and step 1 is evaluated once. eval_every 1: it was evaluated
    # before its checkpoint was written; 0: when the run stopped, after it, and `killed` makes it as if the run had been killed
    # while it drew for step 2, before that evaluation, which the resumed run then makes
    held = tmp_path / "held.txt"
    held.write_text("the sky is blue and the sea is green .\n")
    flags = {"objective": "online-dpo", "reward": "indexed-then-constant", "steps": 3, "save_every": 1, "eval_every": eval_every,
             "validation_dataset": [str(held)], "test_prompts": ["Name a fruit."]}
    first = online_run(tmp_path, tiny_model_dir, stopping_registry, **flags)
    run, evaluated = tmp_path / "run", [(1, False), (1, True)] if eval_every == 0 else [(1, True)]
    assert [(m["step"], "validation/loss" in m) for m in first] == evaluated
    (run / "final" / "README.md").unlink()
    state = run / "checkpoint-000001" / "state.json"
    assert json.loads(state.read_text())["evaluated"]  # before the checkpoint was written, or noted in it when the run stopped
    if killed:
        state.write_text(json.dumps({**json.loads(state.read_text()), "evaluated": False}))
        (run / "metrics.jsonl").write_text(json.dumps(first[0]) + "\n")  # the evaluation's line and answer were not written yet
        (run / "generations.jsonl").unlink()

    lines = online_run(tmp_path, tiny_model_dir, registry_with_reward("indexed-then-constant", Constant), resume=str(run), **flags)
    assert [(m["step"], "validation/loss" in m) for m in lines] == evaluated  # each evaluation logged once
    assert lines[-1]["validation/loss"] == pytest.approx(first[-1]["validation/loss"])
    assert "- steps: 3 (stopped after 1)," in (run / "final" / "README.md").read_text()
    assert [json.loads(line)["step"] for line in open(run / "generations.jsonl")] == [1]  # its step answered once


def test_a_reward_without_a_reward_score_is_an_error():
    class Nameless(RewardSource):
        def score(self, prompts, completions):
            return {"quality": torch.ones(len(completions))}

    with pytest.raises(PrefError, match="no score named 'reward'"):
        echo_batches(Nameless()).next()


def test_state_and_load_state_continue_the_same_prompt_order():
    # 7 prompts, 3 a step: the third draw crosses into the second (reshuffled) epoch
    data = echo_batches(Indexed())
    for _ in range(3):
        data.next()
    state = data.state()
    for _ in range(3):
        data.next()
    continued = data.policy.calls[3:]

    resumed = echo_batches(Indexed())
    resumed.load_state(state)
    for _ in range(3):
        resumed.next()
    assert resumed.policy.calls == continued

    fresh, other_seed = echo_batches(Indexed()), echo_batches(Indexed(), seed=6)
    fresh.next()
    other_seed.next()
    assert fresh.policy.calls[0] == data.policy.calls[0]  # same seed, same order
    assert other_seed.policy.calls[0] != data.policy.calls[0]


def test_a_pool_holds_every_prompts_scores_and_its_own_shares_texts():
    """Process 1 of 2 samples prompts 1 and 3 (2 answers each, scored by their length); process 0 gave 0 and 2 the scores
    [1, 2] and [3, 4]. Every process has all four rows of scores, in prompt order; the texts only of its own prompts."""
    from types import SimpleNamespace

    from pref.online import sample_pool

    class Length(RewardSource):
        def score(self, prompts, completions):
            return {"reward": torch.tensor([float(len(c)) for c in completions])}

    class SecondOfTwo:
        rank, world = 1, 2

        def gather(self, rows):
            return [(0, {"reward": [1.0, 2.0]}), (2, {"reward": [3.0, 4.0]}), *rows]

    def sample(prompts, k, sampling):
        ones = torch.ones(len(prompts) * k, 2, dtype=torch.long)
        return SimpleNamespace(completions=[[p * (j + 1) for j in range(k)] for p in prompts], sequences=Sequences(ones, ones, ones))

    policy = SimpleNamespace(sample=sample)
    pool = sample_pool(policy, ["a", "bb", "c", "ddd"], Length(), 2, SamplingConfig(), 8, SecondOfTwo())
    assert pool.prompts == ["a", "bb", "c", "ddd"]
    assert pool.scores["reward"].tolist() == [[1.0, 2.0], [2.0, 4.0], [3.0, 4.0], [3.0, 6.0]]
    assert pool.completions == [[], ["bb", "bbbb"], [], ["ddd", "dddddd"]]
