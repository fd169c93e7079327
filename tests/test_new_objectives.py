"""KTO, ORPO, CPO, SFT, GRPO and RLOO as objectives: short CLI runs on the tiny default model, and bad options."""

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from pref.cli.main import cli
from pref.interfaces import Minibatch, Rollout, ScoredBatch
from pref.plugins.kto import swap_completions
from pref.registry import load_registry
from pref.sequences import Sequences
from trained_alike import assert_trained_alike  # tests/ is on sys.path


def pref_run(tmp_path, model, *args):
    """`pref run` on the CPU; returns the metrics lines of the finished run."""
    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["run", "--model", model, "--device", "cpu", "--output-dir", out, *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert os.path.isdir(os.path.join(out, "final"))
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for metrics in lines:
        assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float)), metrics
    return lines


def test_kto_trains_from_the_cli(tmp_path, tiny_model_dir, prefs_file):
    """A prompt/chosen/rejected file is one desirable and one undesirable answer per row; the KL rows need a frozen reference."""
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "kto", "--dataset", prefs_file, "--steps", "2", "--batch-size", "4",
                     "-o", "desirable_weight=1.2")
    assert [m["step"] for m in lines] == [1, 2]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(lines[0])
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert lines[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)


def test_kto_with_a_cache_says_to_use_a_model(tmp_path, tiny_model_dir, prefs_file):
    result = CliRunner().invoke(cli, ["run", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", str(tmp_path / "run"),
                                      "--objective", "kto", "--dataset", prefs_file, "--steps", "1", "--batch-size", "2", "--reference", "cached"])
    assert result.exit_code == 2
    assert "--reference model" in result.output and "Traceback" not in result.output


def test_orpo_trains_from_the_cli(tmp_path, tiny_model_dir, prefs_file):
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "orpo", "--dataset", prefs_file, "--steps", "3", "--batch-size", "2", "-o", "beta=0.2")
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"} <= set(lines[-1])


@pytest.mark.parametrize("loss_type", ["simpo", "alphapo"])
def test_cpo_trains_from_the_cli(tmp_path, tiny_model_dir, prefs_file, loss_type):
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "cpo", "--dataset", prefs_file, "--steps", "2", "--batch-size", "2",
                     "-o", f"loss_type={loss_type}", "-o", "beta=2.0", "-o", "alpha=0.25")
    assert lines[0]["nll_loss"] == (0.0 if loss_type == "alphapo" else pytest.approx(lines[0]["nll_loss"]))
    assert lines[0]["logps/chosen"] > -20  # averaged per token for simpo and alphapo


def test_sft_trains_from_the_cli_on_prompt_completion_and_messages(tmp_path, tiny_model_dir):
    data = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "Name a fruit.", "completion": "apple"},
        {"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "the sky is blue ."}]},
        {"prompt": "Name an animal.", "chosen": "dog", "rejected": "the table"},
        {"prompt": "Name a fruit.", "completion": "chair", "label": "negative"},  # not learnt
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "sft", "--dataset", str(data), "--steps", "3", "--batch-size", "2")
    assert lines[0]["loss"] == pytest.approx(-lines[0]["logps/mean"], abs=1e-5)
    assert 0 < lines[0]["num_tokens"] < lines[1]["num_tokens"] < lines[2]["num_tokens"]  # TRL's: the tokens trained on so far, not per batch

    from pref.plugins.sft import CompletionData

    examples = CompletionData(str(data)).build()
    assert [e.completion for e in examples] == ["apple", "the sky is blue .", "dog"]
    assert examples[1].prompt == [{"role": "user", "content": "What color is the sky?"}]


def test_sft_over_micro_batches_is_one_batch_holding_them_all(tmp_path, tiny_model_dir):
    # answers of very different lengths: the mean over each micro-batch's tokens, averaged, would weigh a short answer's
    # tokens more; TRL's num_items_in_batch averages over all the step's tokens, as one batch of 4 does
    from safetensors.torch import load_file

    data = tmp_path / "sft.jsonl"
    answers = ["yes", "the sky is blue and the sea is green and the grass is green too .", "apple", "a dog , a cat , a bird and a fish ."] * 2
    data.write_text("".join(json.dumps({"prompt": f"Say something {i}.", "completion": a}) + "\n" for i, a in enumerate(answers)))
    common = ["--objective", "sft", "--dataset", str(data), "--steps", "2", "--lr", "1e-2", "--bucket-window", "0", "--seed", "3"]
    final = {}
    for name, split in [("whole", ["--batch-size", "4"]), ("accumulated", ["--batch-size", "2", "--grad-accum", "2"])]:
        pref_run(tmp_path / name, tiny_model_dir, *common, *split)
        final[name] = load_file(os.path.join(tmp_path / name / "run", "final", "model.safetensors"))
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max(float((final["whole"][k] - start[k]).abs().max()) for k in start) > 1e-2
    # Adam's steps of lr 1e-2 turn rounding into ~1e-5 (and a few gradients near 0 into ~lr); each micro-batch's mean,
    # averaged, ends ~3e-2 away
    assert_trained_alike(final["accumulated"], final["whole"], atol=1e-4)


GROUP_METRICS = {"reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "num_iteration"}


def test_grpo_trains_from_the_cli(tmp_path, tiny_model_dir):
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "grpo", "--reward", "noun-diversity", "--steps", "2", "--batch-size", "1",
                     "-k", "3", "-o", "num_iterations=2", "-o", "beta=0.04", "-o", "epsilon_high=0.28")
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert GROUP_METRICS | {"kl", "clip_ratio/region_mean", "clip_ratio/high_mean"} <= set(metrics)
    # num_iterations 2: steps 1 and 2 train on the same rollout
    assert lines[0]["reward"] == lines[1]["reward"] and [m["num_iteration"] for m in lines] == [0, 1]
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-5) and lines[0]["clip_ratio/region_mean"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_every_grpo_loss_type_runs(tmp_path, tiny_model_dir, loss_type):
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "grpo", "--reward", "noun-diversity", "--steps", "1", "--batch-size", "1",
                     "-k", "2", "-o", f"loss_type={loss_type}")
    assert GROUP_METRICS <= set(lines[0])


def test_rloo_trains_from_the_cli_with_a_weighted_reward(tmp_path, tiny_model_dir):
    lines = pref_run(tmp_path, tiny_model_dir, "--objective", "rloo", "--reward", "weighted",
                     "--reward-option", "rewards={noun-diversity: 1.0, repetition: 0.5}", "--steps", "2", "--batch-size", "1", "-k", "2")
    for metrics in lines:
        assert GROUP_METRICS | {"kl", "clip_ratio/region_mean", "rewards/noun-diversity/mean", "rewards/repetition/mean"} <= set(metrics)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "objective,option,message",
    [
        ("kto", "loss_type=kto_pair", "unknown KTO loss_type"),
        ("orpo", "beta=-1", "beta"),
        ("cpo", "loss_type=dpo", "unknown CPO loss_type"),
        ("sft", "loss_type=ce", "unknown SFT loss_type"),
        ("grpo", "scale_rewards=mean", "unknown scale_rewards"),
        ("grpo", "loss_type=ppo", "unknown GRPO loss_type"),
        ("rloo", "num_iterations=0", "num_iterations"),
        ("dpo", "loss_type=sigmoid,bco_pair", "one weight per loss_type"),
        ("divpo", "f_divergence_type=bogus", "unknown f_divergence_type"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, objective, option, message):
    extra = ["-o", "loss_weights=1"] if objective == "dpo" else []
    result = CliRunner().invoke(cli, ["run", "--objective", objective, "-o", option, *extra, "--steps", "1", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def test_grpo_needs_two_samples_per_prompt():
    from pref.errors import PrefError
    from pref.plugins.grpo import GRPO

    batch = ScoredBatch(["p"], ["a"], Sequences(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.tensor([[0, 1]])),
                        {"reward": torch.ones(1)}, 1)
    with pytest.raises(PrefError, match="--samples-per-prompt 2 or more"):
        GRPO().loss(None, None, Minibatch(Rollout(batch), torch.tensor([0])))


def test_swap_completions_moves_answers_between_prompts():
    """Row 0: prompt [5, 6], answer [7]; row 1: prompt [8], answer [9, 10] + a trailing non-completion token 11."""
    sequences = Sequences(
        torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 0]]),
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
        torch.tensor([[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]),
    )
    swapped = swap_completions(sequences, [1, 0], pad_id=0)
    assert swapped.input_ids.tolist() == [[5, 6, 9, 10, 11], [8, 7, 0, 0, 0]]
    assert swapped.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert swapped.completion_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]


def test_new_objectives_are_listed_with_a_description():
    registry = load_registry()
    for name in ("kto", "orpo", "cpo", "sft", "grpo", "rloo"):
        item = registry.get("objective", name)
        assert item.builtin and item.description and item.description == item.factory.__doc__.splitlines()[0]
