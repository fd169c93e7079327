"""`--log-completions`: each logged step's rollout, every sample with its prompt and scores, reaches the loggers."""

import json
import os

import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.config import build_config
from pref.errors import PrefError
from pref.plan import resolve_plan
from pref.registry import load_registry


def run(tmp_path, model, *flags):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--reward", "repetition", "--model", model, "--device", "cpu", "--no-progress",
                                      "--batch-size", "2", "-k", "2", "--max-new-tokens", "4", "--output-dir", out, "--log-completions", *flags])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_each_logged_steps_rollout_goes_to_completions_jsonl(tmp_path, tiny_model_dir):
    out = run(tmp_path, tiny_model_dir, "--steps", "3", "--log-every", "2")
    rows = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [2, 3] and [r["step"] for r in rows] == [2] * 4 + [3] * 4  # 2 prompts x 2 samples
    assert {"prompt", "completion", "reward"} <= set(rows[0])
    for step in (2, 3):  # the rows are the samples the step's reward figures came from
        rewards = [r["reward"] for r in rows if r["step"] == step]
        assert sum(rewards) / len(rewards) == pytest.approx(next(m for m in metrics if m["step"] == step)["reward"], abs=1e-6)
    report = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", out, "--output", str(report)])
    assert result.exit_code == 0, (result.output, result.exception)
    page = report.read_text()
    assert "<h2>Completions</h2>" in page and "step 3:" in page.split("<h2>Completions</h2>")[1]


def test_ppo_logs_a_rollout_once_however_many_steps_it_serves(tmp_path, tiny_model_dir):
    out = str(tmp_path / "ppo")
    result = CliRunner().invoke(cli, ["run", "--objective", "ppo", "--reward", "repetition", "--model", tiny_model_dir, "--device", "cpu",
                                      "--no-progress", "--batch-size", "2", "-k", "2", "--max-new-tokens", "4", "--output-dir", out,
                                      "--log-completions", "--steps", "4", "-o", "ppo_epochs=2"])
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    assert sorted({r["step"] for r in rows}) == [1, 3]  # each rollout serves 2 steps: logged at the step that drew it


def test_divpo_logs_the_pools_its_pairs_were_chosen_from(tmp_path):
    out = str(tmp_path / "divpo")
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--steps", "2", "--batch-size", "2", "-k", "3",
                                      "--output-dir", out, "--log-completions"])  # the default job: DivPO on the default model
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    assert [r["step"] for r in rows] == [1] * 6 + [2] * 6  # 2 prompts x 3 samples a step, every one of the pool
    assert {"prompt", "completion", "reward", "quality"} <= set(rows[0])
    assert all(len({r["prompt"] for r in rows[i : i + 3]}) == 1 for i in range(0, 12, 3))  # a prompt's 3 samples together


def test_an_objective_without_rollouts_refuses_it(prefs_file):
    config = build_config(flags={"objective": "dpo", "dataset": [prefs_file], "log_completions": True})
    with pytest.raises(PrefError, match="trains on a dataset and samples nothing: there are no completions to log.*drop --log-completions"):
        resolve_plan(config, load_registry())


def test_a_resumed_run_drops_the_completions_of_the_steps_it_trains_again(tmp_path):
    from pref.plugins.loggers import JsonlLogger

    logger = JsonlLogger(str(tmp_path))
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0})
        logger.log_completions(step, [{"prompt": "p", "completion": f"c{step}", "reward": 0.5}])
    logger.close()
    resumed = JsonlLogger(str(tmp_path))
    resumed.start(total_steps=4, start_step=2)
    resumed.log_completions(3, [{"prompt": "p", "completion": "again", "reward": 1.0}])
    resumed.close()
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert [(r["step"], r["completion"]) for r in rows] == [(1, "c1"), (2, "c2"), (3, "again")]
