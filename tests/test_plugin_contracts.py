"""What docs/plugins.md promises a plugin author, checked in short runs of throw-away plugins on the tiny model."""

import dataclasses
import json
import os

import pytest
import torch
from click.testing import CliRunner

from pref import ObjectiveNeeds, PairSelector, PrefError, RewardSource, SecondModel, Selection, hookimpl
from pref.config import build_config
from pref.online import check_selection, checked_scores
from pref.plugins.dpo import DPO
from pref.plugins.grpo import GRPO
from pref.registry import Registry, get_plugin_manager
from pref.train import checked_loss, train


class Counter(SecondModel):
    """A one-weight second model given one batch to train on after each batch of the policy's data."""

    def __init__(self):
        self.model, self.lr = torch.nn.Linear(1, 1), 0.1

    def batches(self):
        return [torch.ones(2, 1)]

    def loss(self, batch):
        return self.model(batch).pow(2).mean(), {}

    def trained(self, steps):
        return {"second/steps": float(len(steps))}


class WithSecondModelMixin:
    def setup(self, policy):
        self.counter = Counter()

    def second_model(self):
        return self.counter


class PairsWithSecond(WithSecondModelMixin, DPO):
    needs = ObjectiveNeeds(reference="none", second_model=True)


class SamplesWithSecond(WithSecondModelMixin, GRPO):
    def __init__(self):
        super().__init__()
        self.needs = dataclasses.replace(self.needs, samples_per_prompt=2, second_model=True)


class SecondModelPlugin:
    @hookimpl
    def register_objectives(register):
        register("pairs-with-second", PairsWithSecond)
        register("samples-with-second", SamplesWithSecond)


def registry_with(plugin):
    pm, failures, sources = get_plugin_manager()
    pm.register(plugin, name="test-plugin")
    return Registry(pm, failures, sources)


@pytest.mark.parametrize("flags", [
    {"objective": "pairs-with-second"},  # offline
    {"objective": "samples-with-second", "reward": "repetition", "max_new_tokens": 4},  # online, every sample (no selector)
])
def test_a_second_model_is_trained_whatever_data_the_objective_learns_from(tmp_path, tiny_model_dir, prefs_file, flags):
    config = build_config(flags={"model": tiny_model_dir, "dataset": [prefs_file] if flags["objective"] == "pairs-with-second" else [],
                                 "steps": 2, "batch_size": 2, "device": "cpu", "output_dir": str(tmp_path / "run"), **flags})
    out = train(config, registry_with(SecondModelPlugin))
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [line.get("second/steps") for line in lines] == [1.0, 1.0]


class ListReward(RewardSource):
    default_prompts = ["Hello.", "Hi."]

    def score(self, prompts, completions):
        return {"reward": [1.0] * len(completions)}


@pytest.mark.parametrize("scores, message", [
    ({"words": torch.ones(3)}, "gave no score named 'reward' (it gave words); its score() must return a dict with 'reward'"),
    (None, "gave no score named 'reward' (it gave a NoneType)"),  # score() forgot its return
    ({"reward": [1.0, 2.0, 3.0]}, "score 'reward' is a list; score() must give a float tensor [3], one value per answer"),
    ({"reward": torch.ones(3), "words": torch.ones(3, 2)}, "score 'words' is a tensor of shape [3, 2]"),
])
def test_a_reward_plugins_wrong_scores_are_one_line_errors_naming_it(scores, message):
    with pytest.raises(PrefError, match="reward ListReward") as caught:
        checked_scores(ListReward(), scores, 3)
    assert message in str(caught.value)
    assert checked_scores(ListReward(), {"reward": torch.tensor([1, 0, 1])}, 3)["reward"].dtype == torch.float32


def test_a_reward_that_gives_no_tensors_stops_an_online_run_with_a_one_line_error(tiny_model_dir, tmp_path):
    class ListRewardPlugin:
        @hookimpl
        def register_rewards(register):
            register("list-reward", ListReward)

    config = build_config(flags={"objective": "grpo", "reward": "list-reward", "model": tiny_model_dir, "dataset": [], "steps": 1,
                                 "batch_size": 2, "max_new_tokens": 4, "device": "cpu", "output_dir": str(tmp_path / "run")})
    with pytest.raises(PrefError, match="ListReward's score 'reward' is a list"):
        train(config, registry_with(ListRewardPlugin))


class PairsOnly(PairSelector):
    def select(self, pool):
        return Selection()


@pytest.mark.parametrize("data, selection, message", [
    ("pairs", Selection(accepted=[(0, 1)], rejected=[(0, 0)]),
     "pair selector PairsOnly picked accepted and rejected sets, but the objective learns from pairs: choose a selector that picks pairs"),
    ("sets", Selection(pairs=[(0, 1, 0)]), "picked pairs, but the objective learns from sets: choose a selector that picks sets"),
    ("pairs", Selection(pairs=[(0, 1, 4)]), "pair selector PairsOnly picked (0, 1, 4), outside its pool of 2 prompts x 4 samples"),
    ("sets", Selection(accepted=[(2, 0)]), "picked (2, 0), outside its pool of 2 prompts x 4 samples"),
    ("pairs", Selection(pairs=[(0, -1, 0)]), "picked (0, -1, 0), outside"),  # would quietly index the last sample
])
def test_a_selection_the_objective_cannot_use_is_a_one_line_error_naming_the_selector(data, selection, message):
    with pytest.raises(PrefError) as caught:
        check_selection(PairsOnly(), selection, data, prompts=2, k=4)
    assert message in str(caught.value)
    check_selection(PairsOnly(), Selection(pairs=[(1, 3, 0)], metrics={"x": 1.0}), "pairs", prompts=2, k=4)
    check_selection(PairsOnly(), Selection(), "sets", prompts=2, k=4)  # nothing picked: drawn again, not an error


class NeedsFromAnOption(DPO):
    def __init__(self, reference: str = "logps"):
        super().__init__()
        self.needs = dataclasses.replace(self.needs, reference=reference)


class NeedsAsADict(DPO):
    needs = {"reference": "none"}


class NeedsPlugin:
    @hookimpl
    def register_objectives(register):
        register("needs-from-an-option", NeedsFromAnOption)
        register("needs-as-a-dict", NeedsAsADict)


@pytest.mark.parametrize("objective, options, message", [
    ("needs-from-an-option", {"reference": "frozen"}, "ObjectiveNeeds.reference must be none, logps or distributions, not 'frozen'"),
    ("needs-as-a-dict", {}, "objective 'needs-as-a-dict' (test-plugin): its needs must be a pref.ObjectiveNeeds, not a dict"),
])
def test_an_objectives_invalid_needs_are_a_one_line_error_at_exit_2(monkeypatch, prefs_file, objective, options, message):
    import pref.cli.main
    import pref.policy

    monkeypatch.setattr(pref.cli.main, "load_registry", lambda: registry_with(NeedsPlugin))
    monkeypatch.setattr(pref.policy.HFPolicy, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))
    args = ["run", "--objective", objective, "--dataset", prefs_file, *(f"-o{key}={value}" for key, value in options.items())]
    result = CliRunner().invoke(pref.cli.main.cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("result, message", [
    ((torch.tensor(1.0), {"kl": torch.tensor(0.5)}), "gave the metric 'kl' as a Tensor; metrics must be floats (tensor.item())"),
    ((torch.ones(3), {}), "gave a tensor of shape [3]; it must return (the scalar loss tensor, a dict of float metrics)"),
    (torch.tensor(1.0), "gave a Tensor; it must return (the scalar loss tensor, a dict of float metrics)"),  # no metrics
    ((torch.tensor(1.0), None), "gave a tuple; it must return"),
])
def test_an_objectives_wrong_loss_result_is_a_one_line_error_naming_it(result, message):
    with pytest.raises(PrefError, match="objective mine's loss") as caught:
        checked_loss("mine", result)
    assert message in str(caught.value)
    assert checked_loss("mine", (torch.tensor(1.0), {"kl": 0.5, "pairs": 2})) == (torch.tensor(1.0), {"kl": 0.5, "pairs": 2})


class TensorMetric(DPO):
    def loss(self, policy, reference, batch):
        loss, metrics = super().loss(policy, reference, batch)
        return loss, {**metrics, "loss/again": loss}


class TensorMetricPlugin:
    @hookimpl
    def register_objectives(register):
        register("tensor-metric", TensorMetric)


def test_a_metric_left_a_tensor_stops_the_run_at_its_first_step(tmp_path, tiny_model_dir, prefs_file):
    config = build_config(flags={"objective": "tensor-metric", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 2, "batch_size": 2,
                                 "device": "cpu", "output_dir": str(tmp_path / "run")})
    with pytest.raises(PrefError, match="metric 'loss/again' as a Tensor"):
        train(config, registry_with(TensorMetricPlugin))
