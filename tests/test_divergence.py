"""A diverging run stops at once with a one-line error; nothing non-finite is saved; hopeless settings are refused up front."""

import os
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pref.agreement import next_batch_together
from pref.checkpoint import list_checkpoints
from pref.cli.main import cli
from pref.config import build_config
from pref.divergence import check_weights
from pref.errors import NoUsablePairs, PrefError
from pref.policy import HFPolicy
from pref.registry import load_registry
from pref.train import train


def pref(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, AssertionError), result.exception
    return result


def error_line(result):
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    return line


def test_a_diverging_dpo_run_stops_and_keeps_only_finite_checkpoints(tmp_path, tiny_model_dir, prefs_file):
    out = tmp_path / "run"
    # Adam's first step moves each weight by about --lr: weights of 1e12 overflow the attention scores of the next forward
    # (from 1e9 to 1e15 alike; 1e3 diverged on one CPU and not on another)
    line = error_line(pref("run", "--objective", "dpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--lr", "1e12",
                           "--save-every", "1", "--keep-checkpoints", "2", "--steps", "12", "--batch-size", "2", "--device", "cpu",
                           "--output-dir", out))
    assert line.startswith("Error: training diverged at step ")
    assert "lower --lr (now 1e+12)" in line
    assert not (out / "final").exists()
    kept = list_checkpoints(str(out))
    assert kept, "the checkpoints before the divergence are kept"
    for checkpoint in kept:
        for name, tensor in load_file(os.path.join(checkpoint, "model.safetensors")).items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)


@pytest.mark.parametrize("flags, named", [
    (["--lr", "inf"], "--lr is inf: a run with it cannot train; give a finite number"),
    (["--lr", "nan"], "lr must be positive, not nan"),  # the config's own check comes first
    (["--beta", "nan"], "objective option 'beta' is nan: a run with it cannot train; give a finite number"),
    (["-o", "beta=.inf"], "objective option 'beta' is inf: a run with it cannot train; give a finite number"),
])
def test_non_finite_settings_are_refused_before_the_model_loads(tmp_path, prefs_file, monkeypatch, flags, named):
    monkeypatch.setattr(HFPolicy, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    line = error_line(pref("run", "--objective", "dpo", "--dataset", prefs_file, "--device", "cpu", "--output-dir", tmp_path / "run", *flags))
    assert line == f"Error: {named}"


def test_sampling_from_a_diverged_policy_is_the_same_one_line_error():
    class Diverged:
        def next(self):
            # what torch.multinomial raises when the policy's probabilities hold NaN
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    accelerator = SimpleNamespace(num_processes=1)
    with pytest.raises(PrefError, match="^diverged by step 5$"):
        next_batch_together(Diverged(), accelerator, lambda: "diverged by step 5")

    class Broken:
        def next(self):
            raise RuntimeError("some other bug")

    with pytest.raises(RuntimeError, match="some other bug"):  # only the divergence is turned into a user error
        next_batch_together(Broken(), accelerator, lambda: "unused")

    class Exhausted:
        def next(self):
            raise NoUsablePairs("no pair")

    with pytest.raises(NoUsablePairs, match="no pair"):
        next_batch_together(Exhausted(), accelerator, lambda: "unused")


def test_a_diverging_ppo_run_is_a_one_line_error(tmp_path, tiny_model_dir):
    # one epoch per rollout: the second rollout is sampled from the policy the huge step broke
    config = build_config(flags={"objective": "ppo", "reward": "repetition", "model": tiny_model_dir, "steps": 6, "batch_size": 2,
                                 "max_new_tokens": 8, "lr": 1e12, "device": "cpu", "output_dir": str(tmp_path / "ppo"),
                                 "objective_options": {"ppo_epochs": 1}})
    with pytest.raises(PrefError, match="^training diverged (at|by) step "):
        train(config, load_registry())
    assert not (tmp_path / "ppo" / "final").exists()


def test_non_finite_weights_are_not_saved():
    config = SimpleNamespace(lr=0.5, objective_options={"beta": 0.1})
    good, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    check_weights([good], 4, config)
    with pytest.raises(PrefError, match=r"^training diverged by step 4: the weights are no longer finite.*lower --lr \(now 0.5\) or --beta \(now 0.1\)$"):
        check_weights([good, bad], 4, config)
