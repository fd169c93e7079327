"""A resume with other settings: run.json keeps the settings the run started with and records what each resume changed,
the model card and `pref report` show it, and a setting a checkpoint is bound to cannot change."""

import json
import math
import os
import shutil
from unittest import mock

import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.reporting.card import model_card
from pref.reporting.runs import final_config, load_run
from pref.reporting.summary import summary


def pref(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def record(out):
    return json.loads((out / "run.json").read_text())


def logged(out, key):
    return {row["step"]: row[key] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture
def stopped_run(tmp_path, tiny_model_dir, prefs_file):
    """A 2-step DPO run on the tiny model, checkpointed after step 1, at a constant learning rate of 1e-3."""
    out = tmp_path / "run"
    (tmp_path / "constant.yaml").write_text("schedule: constant\n")
    result = pref("--objective", "dpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--steps", 2, "--save-every", 1,
                  "--batch-size", 2, "--lr", 1e-3, "--device", "cpu", "--config", tmp_path / "constant.yaml", "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert "resumes" not in record(out)
    return out


def test_a_resume_keeps_the_settings_the_run_started_with_and_records_its_changes(stopped_run):
    out = stopped_run
    result = pref("--resume", out, "--steps", 3, "--lr", 1e-5)
    assert result.exit_code == 0, result.output
    run = record(out)
    assert (run["config"]["steps"], run["config"]["lr"]) == (2, 1e-3)  # not rewritten as if the whole run had used them
    assert run["resumes"] == [{"step": 1, "changed": {"steps": [2, 3], "lr": [1e-3, 1e-5]}}]
    # the new learning rate does train the resumed steps (the checkpoint's own is not silently kept)
    assert logged(out, "lr") == {1: 1e-3, 2: 1e-5, 3: 1e-5}

    card = (out / "final" / "README.md").read_text()
    assert "- steps: 2, batch size 2" in card and "stopped after" not in card
    assert "- resumed from the checkpoint of step 1 with `steps` 2 -> 3, `lr` 0.001 -> 1e-05" in card
    first = next(line for line in card.splitlines() if line.startswith("pref run --objective"))
    # the first command keeps the checkpoint the resume starts from (its --save-every, every checkpoint kept)
    assert "--steps 2" in first and "--lr 0.001" in first
    assert first.endswith("--config run-config.yaml --save-every 1 --keep-checkpoints 2 --output-dir run")
    assert f"pref run --resume {os.path.join('run', 'checkpoint-000001')} --steps 3 --lr 1e-05" in card
    assert summary(load_run(str(out)))["steps"] == "3"
    assert summary(load_run(str(out)))["options"].endswith("from step 1: steps=3, lr=1e-05")

    # resumed again from its last checkpoint without flags: the run goes on with the settings it had, nothing new recorded
    result = pref("--resume", out, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert record(out)["resumes"] == run["resumes"]
    assert logged(out, "lr")[3] == 1e-5
    # resumed from step 1 again: the earlier resume's steps are trained again, so it is no longer part of the run;
    # a --config file changes settings on a resume as flags do
    (out.parent / "sparse.yaml").write_text("log_every: 2\n")
    result = pref("--resume", out / "checkpoint-000001", "--steps", 4, "--config", out.parent / "sparse.yaml")
    assert result.exit_code == 0, result.output
    assert record(out)["resumes"] == [{"step": 1, "changed": {"steps": [2, 4], "log_every": [1, 2]}}]
    assert logged(out, "lr") == {1: 1e-3, 2: 1e-3, 4: 1e-3}
    # fewer steps than its last checkpoint has trained would leave a final model the record does not describe
    result = pref("--resume", out, "--steps", 2)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == f"Error: cannot resume {out} with steps 2: its checkpoint is at step 3; give --steps 3 or more"


def test_a_resume_cannot_change_what_its_checkpoint_is_bound_to(stopped_run, tiny_model_dir, prefs_file):
    out = stopped_run
    another_model = shutil.copytree(tiny_model_dir, out.parent / "another-model")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    for setting, flags in [("objective", ["--objective", "orpo"]), ("model", ["--model", another_model]), ("batch_size", ["--batch-size", 1]),
                           ("adapter", ["--lora"]), ("validation_dataset", ["--validation-dataset", prefs_file])]:  # best.json compares losses on one held-out set
        result = pref("--resume", out, *flags)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        line = result.stderr.splitlines()[-1]
        assert line.startswith(f"Error: cannot resume {out} with {setting} "), line
        assert line.endswith("which a resume cannot change; resume without changing it, or start a new run with --output-dir NEW")
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # nothing written, nothing removed


def test_a_moved_model_may_be_given_anew_and_is_recorded(stopped_run, tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = record(stopped_run)["config"]
    config["model"] = str(model)
    (stopped_run / "run.json").write_text(json.dumps({**record(stopped_run), "config": config}))
    shutil.rmtree(model)
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-model")
    result = pref("--resume", stopped_run, "--model", moved)
    assert result.exit_code == 0, result.output
    assert record(stopped_run)["resumes"] == [{"step": 1, "changed": {"model": [str(model), str(moved)]}}]


def test_resume_in_a_config_file_resumes_as_the_flag_does(stopped_run):
    (stopped_run.parent / "more.yaml").write_text(f"resume: {stopped_run}\nsteps: 3\n")
    result = pref("--config", stopped_run.parent / "more.yaml")
    assert result.exit_code == 0, result.output
    assert record(stopped_run)["resumes"] == [{"step": 1, "changed": {"steps": [2, 3]}}]
    assert list(logged(stopped_run, "loss")) == [1, 2, 3]


@pytest.mark.parametrize("resume", ["run", "run/checkpoint-000001"])
def test_a_resume_through_the_library_goes_on_in_the_run_folder(stopped_run, tiny_model_dir, prefs_file, resume, monkeypatch):
    from pref.config import build_config
    from pref.registry import load_registry
    from pref.train import train

    monkeypatch.chdir(stopped_run.parent)
    settings = {"objective": "dpo", "dataset": [prefs_file], "model": tiny_model_dir, "steps": 3, "batch_size": 2, "lr": 1e-3,
                "schedule": "constant", "save_every": 1, "device": "cpu", "resume": str(stopped_run.parent / resume)}
    assert train(build_config(flags=settings), load_registry()) == str(stopped_run)  # not a new runs/dpo-TIMESTAMP
    assert record(stopped_run)["resumes"] == [{"step": 1, "changed": {"steps": [2, 3]}}]


def test_a_run_json_of_an_earlier_pref_resumes_with_its_relative_paths_and_the_settings_it_ignored(stopped_run, monkeypatch):
    monkeypatch.chdir(stopped_run.parent)
    old = record(stopped_run)
    # one that used a setting this pref refuses (the reference cache of a TR-DPO run failed at its first loss) cannot go on
    refused = {**old["config"], "reference": "cached", "objective_options": {"sync_ref_model": True}}
    (stopped_run / "run.json").write_text(json.dumps({**old, "config": refused}))
    result = pref("--resume", "run", "--steps", 3)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith('Error: cannot resume run with this version of pref: its run.json records reference "cached", '
                                                     "which this version refuses (--reference cached keeps only")
    # a run.json written before paths were recorded absolute holds them as they were given; -k and --reward-option
    # on an offline objective, and selector options without a selector, were accepted and ignored, as this pref would
    # not have them: left out, with a note
    old["config"].update({"dataset": ["prefs.jsonl"], "samples_per_prompt": 4, "reward_options": {"min_zipf": 3}, "selector_options": {"rho": 0.5}})
    (stopped_run / "run.json").write_text(json.dumps(old))
    result = pref("--resume", "run", "--steps", 3)
    assert result.exit_code == 0, result.output
    assert (f"{os.path.join('run', 'run.json')} records samples_per_prompt 4, which the earlier pref that wrote it ignored and this one refuses "
            "(objective 'dpo' trains on a dataset and samples nothing): resuming without it") in result.stderr.splitlines()
    assert (f"{os.path.join('run', 'run.json')} records selector_options {{\"rho\": 0.5}}, which the earlier pref that wrote it ignored and "
            "this one refuses (selector options were given without --selector): resuming without it") in result.stderr.splitlines()
    assert record(stopped_run)["resumes"] == [{"step": 1, "changed": {"steps": [2, 3]}}]


def test_a_run_json_without_resumes_reads_as_before():
    old = {"config": {"objective": "dpo", "steps": 4, "lr": 0.001, "batch_size": 2, "grad_accum": 1, "schedule": "cosine", "seed": 0},
           "versions": {"pref": "0.1"}}
    assert final_config(old) == old["config"] and final_config({}) == {}
    card = model_card(old, [{"step": 3, "loss": 0.5}])
    assert "- steps: 4 (stopped after 3)" in card and "resumed" not in card
    resumed = {**old, "resumes": [{"step": 2, "changed": {"steps": [4, 8]}}, {"step": 6, "changed": {"lr": [0.001, 0.0001]}}]}
    assert final_config(resumed) == {**old["config"], "steps": 8, "lr": 0.0001}
    assert final_config(resumed, before_step=6) == {**old["config"], "steps": 8}
    assert final_config(resumed, before_step=math.inf) == final_config(resumed)


def test_a_resume_from_an_earlier_checkpoint_drops_the_checkpoints_and_best_model_of_the_steps_it_trains_again(tmp_path, tiny_model_dir,
                                                                                                            prefs_file):
    out = tmp_path / "run"
    # held-out pairs that are the training pairs: each step does better, so the best model is the last step's
    result = pref("--objective", "dpo", "--dataset", prefs_file, "--validation-dataset", prefs_file, "--eval-every", 1, "--model", tiny_model_dir,
                  "--steps", 3, "--save-every", 1, "--batch-size", 2, "--lr", 1e-3, "--device", "cpu", "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "best.json").read_text())["step"] == 3
    result = pref("--resume", out / "checkpoint-000001", "--steps", 2, "--lr", 1e-6)
    assert result.exit_code == 0, result.output
    # step 3 is no longer part of the run: its checkpoint-2 and its best model are set aside, not deleted
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
    [aside] = out.glob("superseded-after-000001-*")
    assert sorted(p.name for p in aside.iterdir()) == ["best", "best.json", "checkpoint-000002"]
    assert json.loads((aside / "best.json").read_text())["step"] == 3
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == 2 and best["validation_loss"] == logged(out, "validation/loss")[2]
    # so a later resume of the run goes on from its own checkpoint, with the settings it has
    # (set aside within the same second as the first resume's, as on a fast machine: its own folder all the same)
    with mock.patch("time.strftime", return_value="20261130-000000"):
        (out / "superseded-after-000001-20261130-000000").mkdir()
        result = pref("--resume", out, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "superseded-after-000001-20261130-000000-1").iterdir()) == ["best", "best.json"]
    assert record(out)["resumes"] == [{"step": 1, "changed": {"lr": [1e-3, 1e-6]}}]
    assert list(logged(out, "loss")) == [1, 2, 3]


def test_a_resume_drops_the_answers_to_test_prompts_of_the_steps_it_trains_again(tmp_path, tiny_model_dir, prefs_file):
    out = tmp_path / "run"
    result = pref("--objective", "dpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--steps", 2, "--save-every", 1, "--batch-size", 2,
                  "--test-prompt", "Name a fruit.", "--device", "cpu", "--output-dir", out)
    assert result.exit_code == 0, result.output
    # extended from its checkpoint of step 1: step 2 is trained again, at another learning rate, and no longer evaluated
    result = pref("--resume", out, "--steps", 3, "--lr", 1e-2)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (out / "generations.jsonl").read_text().splitlines()] == [3]


def test_the_card_says_none_for_a_setting_a_resume_gave_where_there_was_none():
    old = {"config": {"objective": "dpo", "steps": 4, "lr": 0.001, "batch_size": 2, "grad_accum": 1, "schedule": "cosine", "seed": 0},
           "resumes": [{"step": 2, "changed": {"test_prompts": [[], ["Hi.", "Name a fruit."]], "evaluator": [None, "bleu"]}}]}
    card = model_card(old, [{"step": 4, "loss": 0.5}])
    assert "- resumed from the checkpoint of step 2 with `test_prompts` none -> Hi., Name a fruit., `evaluator` none -> bleu" in card

