"""Interrupted starts, resumes from elsewhere, moved data, PPO checkpoints and a full disk."""

import dataclasses
import json
import os
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import pref.train as train_module
from pref.checkpoint import load_checkpoint
from pref.cli.main import cli
from pref.config import build_config
from pref.errors import PrefError
from pref.registry import load_registry
from pref.train import train


def config(out, model, dataset, **flags):
    return build_config(flags={"objective": "dpo", "model": model, "dataset": [dataset], "output_dir": str(out), "batch_size": 2,
                               "steps": 4, "lr": 1e-3, "device": "cpu", **flags})


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("how", ["resume", "restart"])
def test_a_run_stopped_before_its_first_checkpoint_can_go_on(tmp_path, tiny_model_dir, prefs_file, monkeypatch, how, interrupted_after):
    whole = train(config(tmp_path / "whole", tiny_model_dir, prefs_file, save_every=3), load_registry())
    with interrupted_after(1):
        train(config(tmp_path / "broken", tiny_model_dir, prefs_file, save_every=3), load_registry())
    broken = tmp_path / "broken"
    assert (broken / "run.json").exists() and not list(broken.glob("checkpoint-*"))
    flags = {"resume": str(broken)} if how == "resume" else {}
    train(config(broken, tiny_model_dir, prefs_file, save_every=3, **flags), load_registry())
    assert steps_logged(broken) == [1, 2, 3, 4]
    assert_same(final_weights(whole), final_weights(broken))
    # a finished run is still protected
    with pytest.raises(PrefError, match="already holds a run"):
        train(config(broken, tiny_model_dir, prefs_file), load_registry())


def test_resume_cuts_the_log_back_and_works_from_another_directory(tmp_path, tiny_model_dir, prefs_file, monkeypatch, interrupted_after):
    data = tmp_path / "data"
    data.mkdir()
    os.replace(prefs_file, data / "prefs.jsonl")
    monkeypatch.chdir(data)
    with interrupted_after(3):
        train(config(tmp_path / "run", tiny_model_dir, "prefs.jsonl", save_every=2), load_registry())
    record = json.load(open(tmp_path / "run" / "run.json"))
    assert record["config"]["dataset"] == [str(data / "prefs.jsonl")]  # absolute, not as typed

    # a checkpoint from before pref kept the count of tokens trained on: the run goes on without logging a wrong num_tokens
    state_file = tmp_path / "run" / "checkpoint-000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("num_tokens") > 0
    state_file.write_text(json.dumps(state))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"resuming {tmp_path / 'run'} from checkpoint-000002 (step 2 of 4)" in result.stderr  # where it goes on from, said
    assert steps_logged(tmp_path / "run") == [1, 2, 3, 4]  # step 3 logged once, not again after the resume
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert ["num_tokens" in line for line in lines] == [True, True, False, False]


def test_resume_says_when_the_data_moved(tmp_path, tiny_model_dir, prefs_file):
    out = tmp_path / "run"
    train(config(out, tiny_model_dir, prefs_file, steps=2, save_every=1), load_registry())
    os.replace(prefs_file, tmp_path / "moved.jsonl")
    result = CliRunner().invoke(cli, ["run", "--resume", str(out), "--steps", "3"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (f"Error: cannot resume {out}: this run read {prefs_file}, which is no longer there "
                                              "(moved or deleted); put it back, or pass its new place with --dataset (or --model, --reference-model, --chat-template) along with --resume")
    result = CliRunner().invoke(cli, ["run", "--resume", str(out), "--steps", "3", "--dataset", str(tmp_path / "moved.jsonl")])
    assert result.exit_code == 0, result.output


def test_ppo_checkpoints_only_between_rollouts(tmp_path):
    ppo = build_config(flags={"objective": "ppo", "reward": "repetition", "steps": 4, "device": "cpu", "save_every": 3,
                              "output_dir": str(tmp_path / "ppo"), "objective_options": {"ppo_epochs": 2}})
    with pytest.raises(PrefError, match="^--save-every must be a multiple of 2 for ppo: checkpoints are taken between rollouts"):
        train(ppo, load_registry())
    assert not (tmp_path / "ppo").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB filesystem: room for a run's small files, not for a checkpoint of the tiny model."""
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny filesystem needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_a_one_line_error_and_leaves_no_temporary_copy(tiny_disk, tiny_model_dir, prefs_file):
    out = tiny_disk / "run"
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--steps", "3",
                                      "--save-every", "1", "--batch-size", "2", "--device", "cpu", "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.splitlines()[-1]
    assert line.startswith(f"Error: cannot write {out / 'checkpoint-000001'}: No space left on device (ENOSPC); free some space"), line
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


@pytest.mark.parametrize("options", [
    {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
    # BEMA's averages start at step 1, the reference takes them from step 2: step 4's comes from the averages resumed at step 2
    {"bema_reference": True, "bema_update_freq": 1, "bema_update_after": 1, "ref_model_update_freq": 1, "ref_model_update_after": 2},
], ids=["tr-dpo", "bema"])
def test_a_moving_reference_resumes_from_where_it_moved(tmp_path, tiny_model_dir, prefs_file, monkeypatch, interrupted_after, options):
    """TR-DPO and BEMA move the reference; checkpoints keep it (and BEMA's averages), so a resume equals the uninterrupted run."""
    tr_dpo = {"save_every": 2, "reference": "model", "objective_options": options}
    whole = train(config(tmp_path / "whole", tiny_model_dir, prefs_file, **tr_dpo), load_registry())
    checkpoint = tmp_path / "whole" / "checkpoint-000002"
    moved, start = load_file(str(checkpoint / "reference.safetensors")), load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(moved[key], start[key]) for key in moved if key in start)  # the reference did move
    assert any(key.startswith("state/ema/") for key in moved) == ("bema_reference" in options)

    def interrupted_and_resumed(out):
        with interrupted_after(3):
            train(config(out, tiny_model_dir, prefs_file, **tr_dpo), load_registry())
        train(config(out, tiny_model_dir, prefs_file, resume=str(out), **tr_dpo), load_registry())
        assert steps_logged(out) == [1, 2, 3, 4]
        return final_weights(out)

    assert_same(final_weights(whole), interrupted_and_resumed(tmp_path / "resumed"))
    # the check can fail: a resume whose reference starts again from the starting model ends elsewhere
    monkeypatch.setattr(train_module, "load_checkpoint", lambda path, trained, rank=0: load_checkpoint(
        path, dataclasses.replace(trained, reference=None), rank))
    fresh_reference = interrupted_and_resumed(tmp_path / "fresh-reference")
    assert any(not torch.equal(fresh_reference[key], value) for key, value in final_weights(whole).items())


@pytest.mark.parametrize("objective, options", [
    ("sdpo", {"teacher_model_kind": "ema", "teacher_update_rate": 0.5, "success_reward_threshold": 0.5, "distillation_weight": 0.5}),
    ("distill", {"lmbda": 0.5}),
], ids=["sdpo-ema", "gkd"])
def test_online_self_distillation_resumes_exactly(tmp_path, tiny_model_dir, interrupted_after, objective, options):
    """SDPO's teacher, an average that follows the policy, is kept in checkpoints; GKD's choice of which steps sample is a draw of
    the step's number: a resumed run ends with the weights of the uninterrupted one."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n"
                            for p, a in [("Name a fruit.", "An apple."), ("Name an animal.", "A cat."), ("What is your name?", "I am Pref.")]))
    extra = {"reward": ["noun-diversity"], "samples_per_prompt": 2} if objective == "sdpo" else {"reference_model": "pref-default"}
    flags = {"objective": objective, "save_every": 2, "objective_options": options, **extra}
    whole = train(config(tmp_path / "whole", tiny_model_dir, str(data), **flags), load_registry())
    with interrupted_after(3):
        train(config(tmp_path / "resumed", tiny_model_dir, str(data), **flags), load_registry())
    train(config(tmp_path / "resumed", tiny_model_dir, str(data), resume=str(tmp_path / "resumed"), **flags), load_registry())
    assert steps_logged(tmp_path / "resumed") == [1, 2, 3, 4]
    assert_same(final_weights(whole), final_weights(tmp_path / "resumed"))
