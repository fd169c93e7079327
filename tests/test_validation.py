"""Evaluation during training: held-out splits, the evaluators validation-loss (offline and online) and test-prompts,
third-party evaluators, the best model."""

import json
import os
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from pref import Evaluator, Processes
from pref.config import build_config
from pref.data import collate, hold_out
from pref.errors import PrefError
from pref.examples import LabeledExample, PreferenceExample, TextExample
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource
from pref.plugins.preference_data import load_preferences
from pref.policy import HFPolicy
from pref.reference import FrozenReference
from pref.plan import resolve_plan
from pref.plugins.evaluators import GENERATIONS_FILE, scored_text, text_nll
from pref.registry import Registry, get_plugin_manager, load_registry
from pref.train import BEST_DIR, BEST_FILE, train


def test_what_a_likelihood_measure_scores():
    assert scored_text(TextExample(" rest", prompt="start")) == ("start", " rest")
    assert scored_text(PreferenceExample("q", "good", "bad")) == ("q", "good")
    assert scored_text(LabeledExample("q", "answer", False)) == ("q", "answer")
    assert scored_text("Name a fruit.") == ("", "Name a fruit.")


def test_text_nll_is_the_per_token_nll_of_the_text_given_the_prompt(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    policy.model.train()
    records = [TextExample(" is blue .", prompt="the sky"), TextExample(" cat sat on the mat .", prompt="the"), TextExample("hello")]
    nll = text_nll(policy.model, policy, records, batch_size=2)
    sequences = policy.encode([r.prompt for r in records], [r.text for r in records])
    with torch.no_grad():
        logps = policy.logps(sequences)
    expected = -logps.sequence / logps.mask.sum(-1)
    assert_close(nll, expected, atol=1e-5, rtol=1e-5)
    assert policy.model.training  # scored in eval mode, then put back


def test_hold_out_is_seeded_per_dataset_and_keeps_training_data():
    sets = [list(range(10)), list(range(100, 104))]
    kept, held = hold_out(sets, 0.2, seed=3)
    assert len(held) == 2 + 1  # round(0.2 x 10) and at least one of 4
    assert sorted(held + kept[0] + kept[1]) == sorted(sets[0] + sets[1])
    assert hold_out(sets, 0.2, seed=3) == (kept, held)
    assert hold_out(sets, 0.0, seed=3) == (sets, [])
    with pytest.raises(PrefError, match="dataset 2 has 1 records, too few"):
        hold_out([list(range(10)), [7]], 0.5, seed=0)


def test_validation_options_are_checked():
    with pytest.raises(PrefError, match="validation_split must be a share"):
        build_config(flags={"dataset": ["a.jsonl"], "validation_split": 1.0})
    with pytest.raises(PrefError, match="not both"):
        build_config(flags={"dataset": ["a.jsonl"], "validation_split": 0.1, "validation_dataset": "b.jsonl"})
    with pytest.raises(PrefError, match="needs a --dataset"):
        build_config(flags={"validation_split": 0.1})
    with pytest.raises(PrefError, match="eval_every"):
        build_config(flags={"eval_every": -1})


def test_the_plan_turns_on_the_evaluators_the_run_asks_for(tmp_path, prefs_file):
    registry = load_registry()

    def evaluators(**flags):
        config = build_config(flags={"objective": "dpo", "dataset": [prefs_file], "output_dir": str(tmp_path / "run"), **flags})
        return [type(e).__name__ for e in resolve_plan(config, registry).evaluators]

    assert evaluators() == []
    assert evaluators(validation_split=0.1) == ["ValidationLoss"]
    assert evaluators(validation_dataset=prefs_file, test_prompts="Hi.") == ["ValidationLoss", "TestPrompts"]
    plan = resolve_plan(build_config(flags={"objective": "dpo", "dataset": [prefs_file], "test_prompts": ["Hi.", "Yo."],
                                            "max_new_tokens": 5, "output_dir": str(tmp_path)}), registry)
    (test_prompts,) = plan.evaluators
    assert test_prompts.prompts == ["Hi.", "Yo."] and test_prompts.sampling.max_new_tokens == 5 and test_prompts.sampling.temperature == 0
    with pytest.raises(PrefError, match="unknown evaluator 'validation-los'"):
        evaluators(evaluator="validation-los")
    with pytest.raises(PrefError, match="evaluator options were given without --evaluator"):
        evaluators(evaluator_options={"x": 1})


def test_an_online_run_holding_prompts_out_scores_them_with_its_reward(tmp_path, prefs_file):
    def evaluators(**flags):
        config = build_config(flags={"objective": "grpo", "reward": "repetition", "dataset": [prefs_file], "output_dir": str(tmp_path / "run"),
                                     **flags})
        return resolve_plan(config, load_registry()).evaluators

    assert [type(e).__name__ for e in evaluators(validation_split=0.3)] == ["ValidationLoss", "HeldOutReward"]
    _, reward = evaluators(validation_split=0.3, evaluator="reward", evaluator_options={"samples": 3})
    assert reward.samples == 3 and reward.sampling.temperature == 1.0
    with pytest.raises(PrefError, match="the evaluator reward scores answers with the run's reward, which only an online run has"):
        resolve_plan(build_config(flags={"objective": "dpo", "dataset": [prefs_file], "evaluator": "reward", "output_dir": str(tmp_path)}),
                     load_registry())


class Answers:
    """A policy whose answers are "a", "bb", "ccc", ... in the order asked, whatever the prompt."""

    def __init__(self):
        self.asked = []

    def sample(self, prompts, k, sampling):
        from pref.interfaces import Samples

        start = sum(len(p) * n for p, n in self.asked)
        self.asked.append((list(prompts), k))
        return Samples([[chr(97 + i) * (i + 1) for i in range(start + j * k, start + (j + 1) * k)] for j in range(len(prompts))], None)


class LengthAndAnswer(RewardSource):
    columns = ("answer",)

    def score(self, prompts, completions, answer):
        return {"reward": torch.tensor([float(len(c)) for c in completions]), "answered": torch.tensor([float(a == "x") for a in answer])}


def test_the_held_out_reward_by_hand():
    from pref.examples import PromptExample
    from pref.interfaces import SamplingConfig
    from pref.plugins.evaluators import HeldOutReward

    # 3 held-out prompts, 2 answers each, 2 prompts at a time: answers of lengths 1..6, mean 3.5; one row of three has answer "x"
    records = [PromptExample("p", {"answer": "x"}), PromptExample("q", {"answer": "y"}), PromptExample("r", {"answer": "z"})]
    policy = Answers()
    figures = HeldOutReward(LengthAndAnswer(), SamplingConfig(), Processes(), batch_size=2, samples=2).evaluate(4, policy, None, records)
    assert figures == {"eval/reward": pytest.approx(3.5), "eval/answered": pytest.approx(1 / 3)}
    assert policy.asked == [(["p", "q"], 2), (["r"], 2)]
    assert HeldOutReward(LengthAndAnswer(), SamplingConfig(), Processes()).evaluate(4, policy, None, []) == {}


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_offline_run_logs_the_objectives_held_out_loss_and_keeps_the_best(tmp_path, tiny_model_dir, prefs_file):
    config = build_config(flags={
        "objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "validation_split": 0.34, "eval_every": 2,
        "test_prompts": ["What is your name?", "Name a fruit."], "steps": 5, "batch_size": 2, "device": "cpu",
        "log_every": 5, "output_dir": str(tmp_path / "run"),
    })
    out = train(config, load_registry())
    lines = metrics(out)
    assert [m["step"] for m in lines] == [2, 4, 5]  # evaluated steps are logged whatever --log-every says
    losses = {m["step"]: m["validation/loss"] for m in lines}

    # the logged value is DPO's loss on the 2 held-out pairs, as the final model and the start model see them
    _, held = hold_out([load_preferences(prefs_file)], 0.34, seed=0)
    assert len(held) == 2
    final = HFPolicy.load(os.path.join(out, "final"))
    objective = load_registry().create("objective", "dpo", {})
    with torch.no_grad():
        loss, _ = objective.loss(final, FrozenReference.copy_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), collate(final, held))
    assert loss.item() == pytest.approx(losses[5], abs=1e-4)

    best = json.load(open(os.path.join(out, BEST_FILE)))
    assert best["measure"] == "objective loss"
    assert best["validation_loss"] == pytest.approx(min(losses.values())) and losses[best["step"]] == best["validation_loss"]
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, BEST_DIR)) is not None
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]

    generations = [json.loads(line) for line in open(os.path.join(out, GENERATIONS_FILE))]
    assert [(g["step"], g["prompt"]) for g in generations] == [
        (s, p) for s in (2, 4, 5) for p in ("What is your name?", "Name a fruit.")
    ]
    assert all(isinstance(g["text"], str) for g in generations)


class Longer(RewardSource):
    """Reward = answer length, on two prompts of its own."""

    default_prompts = ["Say one word.", "Name a fruit."]

    def score(self, prompts, completions):
        return {"reward": torch.tensor([float(len(c)) for c in completions])}


class LongerPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("longer", Longer)


def test_online_run_logs_the_policys_nll_on_a_validation_dataset(tmp_path, tiny_model_dir):
    held = tmp_path / "held.txt"
    held.write_text("the sky is blue and the sea is green .\nname one random common english noun . apple\n")
    config = build_config(flags={
        "objective": "online-dpo", "reward": "longer", "model": tiny_model_dir, "validation_dataset": [str(held)],
        "steps": 2, "batch_size": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "device": "cpu",
        "output_dir": str(tmp_path / "run"),
    })
    pm, failures, sources = get_plugin_manager()
    pm.register(LongerPlugin(), name="test-longer")
    out = train(config, Registry(pm, failures, sources))
    (last,) = [m for m in metrics(out) if "validation/loss" in m]
    assert last["step"] == 2
    final = HFPolicy.load(os.path.join(out, "final"))
    records = load_registry().create("dataset", "text", {"path": str(held)}).build()
    assert last["validation/loss"] == pytest.approx(text_nll(final.model, final, records).mean().item(), abs=1e-4)
    assert json.load(open(os.path.join(out, BEST_FILE)))["measure"] == "per-token nll"
    assert last["eval/reward"] >= 0  # the run's reward, on the held-out prompts (`test_the_held_out_reward_by_hand`)


class Calls(Evaluator):
    """Counts its calls and reports the held-out records it was given; a third party's evaluator."""

    def __init__(self, scale: float = 1.0):
        self.scale, self.steps = scale, []

    def evaluate(self, step, policy, reference, records):
        self.steps.append(step)
        return {"calls/records": self.scale * len(records), "calls/training": float(policy.model.training)}


made: list[Calls] = []


def calls(scale: float = 1.0) -> Calls:
    made.append(Calls(scale))
    return made[-1]


@hookimpl
def register_evaluators(register):
    register("calls", calls)


def test_a_plugin_evaluator_runs_at_each_evaluation_with_the_held_out_records(tmp_path, tiny_model_dir, prefs_file):
    pm, failures, sources = get_plugin_manager()
    pm.register(sys.modules[__name__], name="test-calls")
    config = build_config(flags={
        "objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "validation_split": 0.34, "eval_every": 2,
        "evaluator": "calls", "evaluator_options": {"scale": 10}, "steps": 3, "batch_size": 2, "device": "cpu",
        "output_dir": str(tmp_path / "run"),
    })
    out = train(config, Registry(pm, failures, sources))
    assert made[-1].steps == [2, 3]  # every --eval-every steps and at the last
    logged = {m["step"]: m for m in metrics(out)}
    assert logged[2]["calls/records"] == 20.0 and logged[3]["calls/records"] == 20.0  # 2 held-out pairs, scaled
    assert logged[2]["calls/training"] == 1.0 and "validation/loss" in logged[2]  # pref's own evaluator ran beside it


class Greedy:
    """A stand-in policy that answers every prompt with "ok"."""

    def generate(self, prompts, k, sampling):
        assert k == 1 and sampling.temperature == 0
        return [["ok"] for _ in prompts]


def test_test_prompts_of_a_resumed_run_replace_the_answers_after_its_checkpoint(tmp_path):
    """The interrupted run answered at steps 2 and 4 (and was killed writing 6); resumed from step 2, it answers 4 again."""
    path = tmp_path / GENERATIONS_FILE
    path.write_text("".join(json.dumps({"step": s, "prompt": "Hi.", "text": f"old {s}"}) + "\n" for s in (2, 4)) + '{"step": 6, "pro')
    evaluator = load_registry().create("evaluator", "test-prompts", {"prompts": ["Hi."]}, output_dir=str(tmp_path),
                                       processes=Processes(), start_step=2)
    assert evaluator.evaluate(4, Greedy(), None, []) == {}
    assert evaluator.evaluate(6, Greedy(), None, []) == {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["text"]) for r in rows] == [(2, "old 2"), (4, "ok"), (6, "ok")]
