"""Several rewards from the CLI and config files: `--reward a --reward b --reward-weights 1,0.5`.

The plan turns them into the `weighted` reward's sum; bad weights are one-line errors (exit 2)
found before any model loads.
"""

import json
import os

import pytest
import torch
from click.testing import CliRunner

from pref.cli.main import cli
from pref.config import build_config
from pref.plan import resolve_plan
from pref.plugins.weighted_reward import WeightedReward
from pref.registry import load_registry


def plan_of(**values):
    return resolve_plan(build_config({}, {"objective": "grpo", **values}), load_registry())


def test_one_reward_is_that_reward():
    plan = plan_of(reward=["repetition"], reward_options={"n": 3})
    assert type(plan.reward).__name__ == "RepetitionReward" and plan.reward.n == 3


def test_several_rewards_are_their_weighted_sum():
    plan = plan_of(reward=["repetition", "noun-diversity"], reward_weights="1,0.5", reward_options={"repetition.n": 3})
    reward = plan.reward
    assert isinstance(reward, WeightedReward)
    assert reward.weights == {"repetition": 1.0, "noun-diversity": 0.5} and reward.parts["repetition"].n == 3
    prompts, answers = ["Name a noun."] * 2, ["dog dog dog dog", "cat"]
    scores = reward.score(prompts, answers)
    parts = {name: part.score(prompts, answers)["reward"].float() for name, part in reward.parts.items()}
    assert torch.allclose(scores["reward"], parts["repetition"] + 0.5 * parts["noun-diversity"])
    assert torch.equal(scores["repetition/reward"], parts["repetition"])


def test_config_file_lists_and_tables(tmp_path):
    """`reward = [...]`, `reward_weights = [...]` and a table of options per reward; `reward = "name"` still works."""
    path = tmp_path / "run.toml"
    path.write_text('objective = "grpo"\nreward = ["repetition", "noun-diversity"]\nreward_weights = [1, 0.5]\n'
                    "[reward_options.repetition]\nn = 4\n")
    from pref.config import read_config_file

    config = build_config(read_config_file(str(path)))
    assert config.reward == ["repetition", "noun-diversity"] and config.reward_weights == [1.0, 0.5]
    reward = resolve_plan(config, load_registry()).reward
    assert reward.weights == {"repetition": 1.0, "noun-diversity": 0.5} and reward.parts["repetition"].n == 4
    assert build_config({"reward": "repetition"}).reward == "repetition"
    assert build_config({"reward": "repetition"}, {"reward": ["noun-diversity"]}).reward == "noun-diversity"


def test_several_rewards_default_to_equal_weights():
    assert plan_of(reward=["repetition", "noun-diversity"]).reward.weights == {"repetition": 1.0, "noun-diversity": 1.0}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--reward", "repetition", "--reward", "noun-diversity", "--reward-weights", "1"], "1 reward weights for 2 rewards"),
        (["--reward", "repetition", "--reward", "noun-diversity", "--reward-weights", "1,x"], "'x' is not a number"),
        (["--reward", "repetition", "--reward", "noun-diversity", "--reward-weights", "1,nan"], "finite"),
        (["--reward", "repetition", "--reward", "noun-diversity", "--reward-weights", "inf,1"], "finite"),
        (["--reward", "repetition", "--reward-weights", "1"], "pass --reward twice or more"),
        (["--reward-weights", "1,2"], "pass --reward twice or more"),
        (["--reward", "repetition", "--reward", "repetition"], "given twice"),
        (["--reward", "repetition", "--reward", "noun-diversity", "--reward-option", "n=3"], "--reward-option repetition.n=VALUE"),
        (["--reward", "repetition", "--reward", "noun-diversity", "--reward-option", "other.n=3"], "name the reward"),
        (["--reward", "repetition", "--reward", "nosuch"], "unknown reward 'nosuch'"),
    ],
)
def test_bad_rewards_and_weights_are_one_line_errors(tmp_path, monkeypatch, args, message):
    from pref.policy import HFPolicy

    monkeypatch.setattr(HFPolicy, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error was found"))
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--steps", "1", "--output-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not os.path.exists(tmp_path / "run")


def test_grpo_with_two_weighted_rewards_from_the_cli_logs_both(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, [
        "run", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", out, "--objective", "grpo",
        "--reward", "noun-diversity", "--reward", "repetition", "--reward-weights", "1,0.5", "--reward-option", "repetition.n=1",
        "--steps", "2", "--batch-size", "1", "-k", "2",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert {"reward", "rewards/noun-diversity/mean", "rewards/repetition/mean"} <= set(metrics)
        # one prompt per step: the logged reward is the weighted sum of the parts' means
        weighted = metrics["rewards/noun-diversity/mean"] + 0.5 * metrics["rewards/repetition/mean"]
        assert metrics["reward"] == pytest.approx(weighted, abs=1e-5)
    with open(os.path.join(out, "run.json")) as f:
        config = json.load(f)["config"]
    assert config["reward"] == ["noun-diversity", "repetition"] and config["reward_weights"] == [1.0, 0.5]


def test_grpo_normalize_then_sum_gets_each_rewards_scores_and_weight(tmp_path, tiny_model_dir, monkeypatch):
    import pref.plugins.grpo as grpo

    seen = []
    original = grpo.decoupled_advantages
    monkeypatch.setattr(grpo, "decoupled_advantages", lambda parts, weights, k, gather=None: seen.append((parts, weights)) or original(parts, weights, k, gather))
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, [
        "run", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", out, "--objective", "grpo",
        "--reward", "noun-diversity", "--reward", "repetition", "--reward-weights", "1,0.5", "--reward-option", "repetition.n=1",
        "-o", "multi_objective_aggregation=normalize_then_sum", "--steps", "1", "--batch-size", "2", "-k", "2",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (parts, weights), = seen
    metrics = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert weights.tolist() == [1.0, 0.5] and parts.shape == (4, 2)
    assert parts.mean(0).tolist() == pytest.approx([metrics["rewards/noun-diversity/mean"], metrics["rewards/repetition/mean"]], abs=1e-5)
