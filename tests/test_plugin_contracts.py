"""What docs/plugins.md promises a plugin author, checked in short runs of throw-away plugins on the tiny model."""

import dataclasses
import json
import os

import pytest
import torch

from pref import ObjectiveNeeds, SecondModel, hookimpl
from pref.config import build_config
from pref.plugins.dpo import DPO
from pref.plugins.grpo import GRPO
from pref.registry import Registry, get_plugin_manager
from pref.train import train


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
