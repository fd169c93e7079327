"""The length, sampling, precision and memory flags of `pref run`: bad values are one-line errors, good ones take effect."""

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import pref.train as train_module
from pref.cli.main import cli
from pref.config import build_config
from pref.precision import resolve_dtype
from pref.registry import load_registry
from pref.train import train_policy
from trained_alike import assert_trained_alike  # tests/ is on sys.path


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be zero"),
    (["--objective", "grpo", "--temperature", "0"], "at --temperature 0 (greedy) they are all the same"),  # K equal samples
    (["--objective", "a2po", "--temperature", "0"], "which greedy decoding (--temperature 0) does not give"),
    (["--top-p", "0"], "top_p must be above 0"),
    (["--top-p", "1.5"], "top_p must be above 0"),
    (["--top-k", "-1"], "top_k must be"),
    (["--min-p", "1"], "min_p must be at least 0 (off) and below 1, not 1.0"),
    (["--weight-decay", "-0.1"], "weight_decay must be zero or positive"),
    (["--warmup-steps", "-1"], "warmup_steps must be zero or positive"),
    (["--max-length", "0"], "max_length must be a positive"),
    (["--max-length", "1"], "max_length must be 2 or more (a prompt token and an answer token), not 1"),
    (["--log-every", "0"], "log_every must be a positive"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive"),
    (["--samples-per-prompt", "0"], "samples_per_prompt must be 1 or more, not 0"),
    (["--max-prompt-length", "0"], "max_prompt_length must be a positive"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype float16 cannot train on a CPU"),
    (["--dtype", "int8"], "Invalid value for '--dtype'"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "--mixed-precision fp16 does nothing on a CPU"),  # accelerate would compute in fp32
    (["--attn-implementation", ""], "attn_implementation must name one of transformers' attention implementations"),
])
def test_bad_values_are_one_line_errors_with_exit_2(monkeypatch, prefs_file, flags, message):
    import pref.policy

    monkeypatch.setattr(pref.policy.HFPolicy, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, *flags])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_the_flags_reach_the_run_configuration(monkeypatch, prefs_file):
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config, registry: seen.setdefault("config", config) and "out")
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--max-length", "128", "--max-prompt-length", "64",
                                      "--max-new-tokens", "16", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "50", "--warmup-steps", "3",
                                      "--weight-decay", "0.01", "--dtype", "bfloat16", "--gradient-checkpointing", "--no-progress"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.max_length, config.max_prompt_length, config.max_new_tokens) == (128, 64, 16)
    assert (config.temperature, config.top_p, config.top_k, config.warmup_steps, config.weight_decay) == (0.7, 0.9, 50, 3, 0.01)
    assert config.dtype == "bfloat16" and config.gradient_checkpointing and not config.progress


def test_repeated_logger_flags_reach_the_run_configuration(monkeypatch, prefs_file):
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config, registry: seen.setdefault("config", config) and "out")
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--logger", "jsonl", "--logger", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert seen["config"].loggers == ["jsonl", "tensorboard"]


def test_auto_dtype_is_float32_on_a_cpu(tiny_model_dir, monkeypatch):
    assert resolve_dtype("auto", "cpu", tiny_model_dir) == torch.float32
    assert resolve_dtype("bfloat16", "cpu", tiny_model_dir) == torch.bfloat16
    # where the stored dtype cannot matter, the model's config is not read: a hub id is not asked for before the flags are checked
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: pytest.fail("read the model's config"))
    assert resolve_dtype("auto", "cpu", "some-org/some-model") == torch.float32


def dpo(tmp_path, model, data, name, **flags):
    config = build_config(flags={"objective": "dpo", "model": model, "dataset": [data], "output_dir": str(tmp_path / name), "batch_size": 2,
                                 "steps": 3, "lr": 1e-3, "device": "cpu", "reference": "model", **flags})
    return train_policy(config, load_registry())


def test_a_bf16_run_keeps_its_trained_weights_in_float32_and_its_reference_in_bf16(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    seen = {}
    original = train_module.build_reference

    def spy(*args):
        seen["reference"] = original(*args)
        return seen["reference"]

    monkeypatch.setattr(train_module, "build_reference", spy)
    _, policy = dpo(tmp_path, tiny_model_dir, prefs_file, "full", dtype="bfloat16")
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}  # the optimizer's state follows them
    assert {p.dtype for p in seen["reference"].model.parameters()} == {torch.bfloat16}
    _, policy = dpo(tmp_path, tiny_model_dir, prefs_file, "lora", dtype="bfloat16", lora=True, lora_options={"r": 4})
    dtypes = {name: p.dtype for name, p in policy.model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_model_dir, prefs_file, lora):
    extra = {"lora": True, "lora_options": {"r": 4, "dropout": 0.0}} if lora else {}
    plain, _ = dpo(tmp_path, tiny_model_dir, prefs_file, "plain", **extra)
    checkpointed, policy = dpo(tmp_path, tiny_model_dir, prefs_file, "checkpointed", gradient_checkpointing=True, **extra)
    assert getattr(policy.model, "is_activation_checkpointing", None) or policy.model.is_gradient_checkpointing
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(os.path.join(plain, "final", name)), load_file(os.path.join(checkpointed, "final", name))
    assert_trained_alike(a, b, atol=1e-5)


def test_the_attention_implementation_trains_the_same_weights_and_one_that_cannot_run_is_a_one_line_error(tmp_path, tiny_model_dir, prefs_file):
    sdpa, _ = dpo(tmp_path, tiny_model_dir, prefs_file, "sdpa")
    eager, policy = dpo(tmp_path, tiny_model_dir, prefs_file, "eager", attn_implementation="eager")
    assert policy.model.config._attn_implementation == "eager"
    a, b = load_file(os.path.join(sdpa, "final", "model.safetensors")), load_file(os.path.join(eager, "final", "model.safetensors"))
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max(float((a[key] - start[key]).abs().max()) for key in a) > 1e-3
    # the kernels round differently, which Adam's first steps magnify to ~2e-5 (the steps move the weights ~3e-3)
    assert_trained_alike(a, b, atol=1e-4)
    for name, reason in [("flash_attention_2", "FlashAttention2 has been toggled on"), ("bogus", 'attn_implementation="bogus"')]:
        result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--steps", "1",
                                          "--device", "cpu", "--output-dir", str(tmp_path / name), "--attn-implementation", name])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"Error: --attn-implementation {name} cannot be used here: ") and reason in line, line
        assert line.endswith("use sdpa (the default) or eager, or install what it needs")


def test_generate_eval_and_compare_sample_through_the_attention_implementation_asked_for(tiny_model_dir, monkeypatch):
    from pref.policy import HFPolicy

    loaded, load = [], HFPolicy.load_model

    def noting(self, *args, **kwargs):
        load(self, *args, **kwargs)
        loaded.append(self.model.config._attn_implementation)

    monkeypatch.setattr(HFPolicy, "load_model", noting)
    commands = [["generate", "--model", tiny_model_dir, "--prompt", "Name a fruit.", "--max-new-tokens", "6"],
                ["eval", "--model", tiny_model_dir, "--reward", "noun-diversity", "--samples", "4", "--json"],
                ["compare", "--before", tiny_model_dir, "--after", tiny_model_dir, "--prompt", "Name a fruit.", "--max-new-tokens", "6"]]
    for command in commands:  # greedy or seeded: the same answers through either kernel
        outputs = [CliRunner().invoke(cli, [*command, "--device", "cpu", *kernel]) for kernel in ([], ["--attn-implementation", "eager"])]
        assert [result.exit_code for result in outputs] == [0, 0], outputs[1].output
        assert outputs[0].stdout == outputs[1].stdout
        bogus = CliRunner().invoke(cli, [*command, "--device", "cpu", "--attn-implementation", "bogus"])
        assert bogus.exit_code == 2 and bogus.stderr.strip().startswith("Error: --attn-implementation bogus cannot be used here: "), bogus.output
    assert loaded == ["sdpa", "eager"] + ["sdpa", "eager"] + ["sdpa"] * 2 + ["eager"] * 2


def test_a_library_caller_may_give_lists_as_tuples():
    config = build_config(flags={"dataset": ("a.jsonl", "b.jsonl"), "loggers": ("jsonl",), "test_prompts": ("Hi",)})
    assert config.dataset == ["a.jsonl", "b.jsonl"] and config.loggers == ["jsonl"] and config.test_prompts == ["Hi"]


@pytest.mark.parametrize("objective,refused", [("grpo", True), ("rloo", True), ("sdpo", True), ("online-dpo", True), ("sdft", False)])
def test_one_sample_per_prompt_is_refused_only_where_samples_are_compared(tmp_path, tiny_model_dir, objective, refused):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Name a fruit.", "privileged_context": "apple"}\n')
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--objective", objective, "--model", tiny_model_dir,
                                      "--dataset", str(data), "--steps", "1", "--batch-size", "1", "-k", "1",
                                      *(["--reward", "noun-diversity"] if objective != "sdft" else []), "--output-dir", str(tmp_path / "run")])
    if refused:
        assert result.exit_code == 2 and "compares the samples of each prompt with each other: pass --samples-per-prompt 2 or more (got 1)" \
            in result.output, result.output
        assert not (tmp_path / "run").exists()  # before anything was written
    else:
        assert result.exit_code == 0, result.output + repr(result.exception)
