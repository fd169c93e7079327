"""A run asked to stop (Ctrl-C, a scheduler's SIGTERM) stops after a step with a checkpoint, and goes on from it exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pref.config import build_config
from pref.errors import RunInterrupted
from pref.plugins.loggers import ProgressBar
from pref.registry import load_registry
from pref.train import train


def config(out, model, dataset, **flags):
    return build_config(flags={"objective": "dpo", "model": model, "dataset": [dataset], "output_dir": str(out), "batch_size": 2,
                               "steps": 6, "lr": 1e-3, "device": "cpu", **flags})


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture
def signalled_after(monkeypatch):
    """`signalled_after(2, SIGTERM)`: the process sends itself the signals once step 2 is shown (after its figures were shared)."""

    def at(step, *numbers):
        original = ProgressBar.show

        def show(self, at_step, metrics):
            original(self, at_step, metrics)
            if at_step == step:
                for number in numbers:
                    signal.raise_signal(number)

        monkeypatch.setattr(ProgressBar, "show", show)

    return at


def test_sigterm_stops_after_the_next_step_with_a_checkpoint_and_the_run_goes_on_exactly(tmp_path, tiny_model_dir, prefs_file, signalled_after):
    whole = train(config(tmp_path / "whole", tiny_model_dir, prefs_file), load_registry())
    handler = signal.getsignal(signal.SIGTERM)
    signalled_after(2, signal.SIGTERM)
    stopped = tmp_path / "stopped"
    with pytest.raises(RunInterrupted) as caught:
        train(config(stopped, tiny_model_dir, prefs_file, log_every=2), load_registry())
    # step 2's figures were shared before the signal: every process learns of it with step 3's
    assert str(caught.value) == f"stopped by SIGTERM after step 3 of 6, saved as checkpoint-000003; go on with: pref run --resume {stopped}"
    assert caught.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler there before is back
    assert sorted(p.name for p in stopped.iterdir()) == ["checkpoint-000003", "metrics.jsonl", "run.json"]  # no final model
    assert steps_logged(stopped) == [2, 3]  # the step it stopped after is logged, whatever --log-every says

    train(config(stopped, tiny_model_dir, prefs_file, resume=str(stopped), log_every=2), load_registry())
    assert steps_logged(stopped) == [2, 3, 4, 6]
    a, b = load_file(os.path.join(whole, "final", "model.safetensors")), load_file(stopped / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_an_online_run_stops_between_rollouts(tmp_path, tiny_model_dir, signalled_after):
    def ppo(out, **flags):  # two optimizer steps on each rollout
        return build_config(flags={"objective": "ppo", "reward": "repetition", "model": tiny_model_dir, "steps": 4, "batch_size": 2,
                                   "max_new_tokens": 4, "device": "cpu", "output_dir": str(out), "objective_options": {"ppo_epochs": 2}, **flags})

    whole = train(ppo(tmp_path / "whole"), load_registry())
    signalled_after(1, signal.SIGINT)
    with pytest.raises(RunInterrupted, match="^stopped by SIGINT after step 2 of 4, saved as checkpoint-000002;"):
        train(ppo(tmp_path / "stopped"), load_registry())
    train(ppo(tmp_path / "stopped", resume=str(tmp_path / "stopped")), load_registry())
    a, b = load_file(os.path.join(whole, "final", "model.safetensors")), load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_model_dir, prefs_file, signalled_after):
    signalled_after(1, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "run", tiny_model_dir, prefs_file, save_every=2), load_registry())
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_on_the_last_step_ends_the_run_as_usual(tmp_path, tiny_model_dir, prefs_file, signalled_after):
    signalled_after(5, signal.SIGINT)
    train(config(tmp_path / "run", tiny_model_dir, prefs_file), load_registry())
    assert (tmp_path / "run" / "final").is_dir() and not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_pref_run_stopped_by_a_signal_says_how_to_go_on_and_exits_with_its_code(tmp_path, tiny_model_dir, prefs_file, number):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pref", "run", "--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file,
               "--steps", "100000", "--batch-size", "2", "--device", "cpu", "--output-dir", str(out)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-2000:]
            time.sleep(0.2)
        run.send_signal(number)
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + number, stderr
    assert "Traceback" not in stderr
    name = signal.Signals(number).name
    last = stderr.strip().splitlines()[-1]
    step = int(last.split("after step ")[1].split()[0])
    assert last == f"stopped by {name} after step {step} of 100000, saved as checkpoint-{step:06d}; go on with: pref run --resume {out}"
    assert steps_logged(out)[-1] == step and (out / f"checkpoint-{step:06d}").is_dir()


def test_ctrl_c_before_the_steps_is_one_line_and_exit_130(prefs_file, monkeypatch):
    from click.testing import CliRunner

    import pref.train
    from pref.cli.main import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pref.train, "train", interrupted)  # a Ctrl-C while the data or the model loads
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file])
    assert result.exit_code == 130 and result.stderr == "Interrupted.\n"
