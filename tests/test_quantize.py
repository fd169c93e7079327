"""--quantize: an adapter trained on a base loaded in 4 bits (QLoRA), through bitsandbytes on the CPU."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pref.cli.main import cli
from pref.config import build_config
from pref.registry import load_registry
from pref.train import train, train_policy


def config(out, model, dataset, **flags):
    return build_config(flags={"objective": "dpo", "model": model, "dataset": [dataset], "output_dir": str(out), "batch_size": 2,
                               "steps": 4, "lr": 1e-2, "device": "cpu", "adapter": "lora", "quantize": "nf4", **flags})


def test_an_adapter_trains_on_a_4bit_base_and_merges_into_the_base_at_full_precision(tmp_path, tiny_model_dir, prefs_file):
    import bitsandbytes
    import peft
    from transformers import AutoModelForCausalLM

    out, policy = train_policy(config(tmp_path / "run", tiny_model_dir, prefs_file, merge_lora=True), load_registry())
    model = policy.model
    quantized = [name for name, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(quantized) >= 4 and all(".base_layer" in name for name in quantized)  # the decoder's linear layers, under LoRA
    assert all(p.dtype == torch.uint8 for name, p in model.named_parameters() if "base_layer" in name and "proj" in name)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {name for name, _ in model.named_parameters() if "lora_" in name}

    # the reference is the 4-bit base with the adapter off: at step 1 the policy is that model, so DPO's margin is 0
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(0.6931472)

    # final/ is the adapter, for the base at full precision; merged/ is that model folded, which plain transformers loads
    final = os.path.join(out, "final")
    assert "--adapter lora --quantize nf4" in open(os.path.join(final, "README.md")).read()  # the model card's command
    merged_config = json.load(open(os.path.join(final, "merged", "config.json")))
    assert "quantization_config" not in merged_config
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(final)
    assert not any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in adapter.modules())
    assert any(p.abs().sum() > 0 for name, p in adapter.named_parameters() if "lora_B" in name)  # trained: B starts at 0
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(final, "merged"))
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)

    # pref generate/eval/compare --quantize: the adapter on its base in 4 bits again, the model it was trained as
    from pref.cli.main import Loading, load_policy
    from pref.interfaces import SamplingConfig

    loaded = load_policy(final, Loading("cpu", quantize="nf4")).model
    assert sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in loaded.modules()) == len(quantized)
    model.eval()  # no adapter dropout
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    result = CliRunner().invoke(cli, ["generate", "--model", final, "--quantize", "nf4", "--device", "cpu", "--prompt", "Name a fruit.",
                                      "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == policy.generate(["Name a fruit."], 1, greedy)[0]


def test_a_4bit_layer_computes_alike_with_and_without_grad_on_a_cpu_with_avx512_bf16(tiny_model_dir, monkeypatch):
    """bitsandbytes packs a 4-bit layer for a bf16 CPU kernel at its first forward in eval mode without grad, on CPUs with
    AVX512-BF16 (forced here): that packing fails at the default model's width (96, not a multiple of 64), and would compute the
    reference otherwise than the policy. pref's models keep the one path: the same logits with grad and without."""
    import bitsandbytes.nn.modules

    from pref.models import load_model

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = load_model(tiny_model_dir, quantize="nf4", device="cpu")
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    with_grad = model(ids).logits.detach()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_grad)


def test_a_4bit_run_resumes_exactly(tmp_path, tiny_model_dir, prefs_file, interrupted_after):
    whole = train(config(tmp_path / "whole", tiny_model_dir, prefs_file), load_registry())
    with interrupted_after(3):
        train(config(tmp_path / "resumed", tiny_model_dir, prefs_file, save_every=2), load_registry())
    train(config(tmp_path / "resumed", tiny_model_dir, prefs_file, save_every=2, resume=str(tmp_path / "resumed")), load_registry())
    a = load_file(os.path.join(whole, "final", "adapter_model.safetensors"))
    b = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # the adapter was trained on nf4 weights: a resume cannot load the base another way
    result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path / "resumed"), "--quantize", "fp4"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"Error: cannot resume {tmp_path / 'resumed'} with quantize ")


@pytest.mark.parametrize("flags, message", [
    ([], "Error: --quantize nf4 loads the base model in 4 bits, which cannot be trained in full: add --lora (or --adapter NAME)"),
    (["--lora", "--fsdp"], "Error: --fsdp cannot shard 4-bit weights: drop --fsdp (each process then holds the whole 4-bit base) or --quantize"),
])
def test_what_a_4bit_base_cannot_do_is_a_one_line_error(tmp_path, prefs_file, flags, message):
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--quantize", "nf4", *flags,
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.stderr.strip() == message
    assert not (tmp_path / "run").exists()


def test_without_bitsandbytes_quantize_says_what_to_install(tmp_path, prefs_file, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args))
    for command in (["run", "--objective", "dpo", "--dataset", prefs_file, "--lora", "--output-dir", str(tmp_path / "run")],
                    ["generate", "--prompt", "Hi"], ["eval", "--reward", "noun-diversity"]):
        result = CliRunner().invoke(cli, [*command, "--quantize", "fp4"])
        assert result.exit_code == 2
        assert result.stderr.strip() == "Error: --quantize fp4 needs the bitsandbytes package: pip install 'pref[quantize]'"


def test_bitsandbytes_notice_of_a_cpu_kernel_pref_never_takes_is_quiet(caplog):
    """On a CPU with AVX512-BF16, importing bitsandbytes (peft and transformers do, for any LoRA run) warns that the faster
    variant of its packed 4-bit kernel is not installed; pref's 4-bit layers never take that kernel, so a model load quiets it."""
    import logging

    from pref.models import quiet_transformers

    quiet_transformers()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    assert not caplog.records
