"""`--cast-lm-head-to-fp32`: a low-precision model's log-probs and samples come from float32 logits, as TRL's `cast_lm_head_to_fp32`."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pref.config import build_config
from pref.errors import PrefError
from pref.precision import head_in_float32
from pref.registry import load_registry
from pref.sequences import Sequences, lean_logps, model_logps
from pref.train import train

VOCAB = 16384  # a realistic vocabulary: bf16 logits of this many tokens round the log-probs visibly


def tiny_llama(tied=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of a trained model's size (tens), where bf16 rounds by tenths
    return model


def rows():
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(12) < torch.tensor([12, 8, 10])[:, None]).long()
    completion = mask.clone()
    completion[:, :4] = 0
    return Sequences(ids * mask, mask, completion)


def trl_log_probs(model, seqs):
    """TRL 1.16's fused LM head with `cast_lm_head_to_fp32` (its GRPO casts the head to float32 first, as here)."""
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(model)
    model.lm_head.float()
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    labels = seqs.input_ids.masked_fill(seqs.completion_mask == 0, -100)
    out = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, labels=labels, fused_lm_head=True)
    return torch.nn.functional.pad(out.log_probs, (1, 0))  # TRL's log_probs[:, t] scores token t + 1


@pytest.mark.parametrize("packing", [False, True])
def test_log_probs_equal_trls_float32_head_and_the_logits_lose_nothing_to_bf16(packing):
    low = tiny_llama().to(torch.bfloat16)
    exact = copy.deepcopy(low).float()  # the same (rounded) weights, all computed in float32
    seqs = rows()
    with torch.no_grad():
        hidden = low.model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).last_hidden_state  # bf16, as the backbone gives it
        from_hidden = lean_logps(hidden.float(), exact, seqs).tokens  # the exact log-probs of these hidden states
        rounded = lean_logps(hidden, low, seqs).tokens
        head_in_float32(low)
        assert low.lm_head.weight.dtype == torch.float32 and low.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        cast = lean_logps(hidden, low, seqs).tokens
        run = model_logps(low, seqs, packing=packing).tokens
        full = model_logps(low, seqs, with_logits=True)  # the model's own head, as sampling runs it
        trl = trl_log_probs(low, seqs) * seqs.completion_mask * (torch.arange(12) > 0)
    torch.testing.assert_close(cast, from_hidden, atol=1e-5, rtol=0)
    assert (rounded - from_hidden).abs().max() > 1e-2  # bf16 logits of a 16k vocabulary round the log-probs by hundredths
    torch.testing.assert_close(run, trl, atol=1e-4, rtol=0)
    assert full.logits.dtype == torch.float32
    torch.testing.assert_close(full.tokens, run, atol=1e-4, rtol=0)


def test_a_tied_embedding_keeps_its_dtype_and_a_copy_keeps_its_own_head():
    model = tiny_llama(tied=True).to(torch.bfloat16)
    head_in_float32(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens(torch.tensor([[5, 6]])).dtype == torch.bfloat16
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.lm_head.weight.zero_()
    seqs = rows()
    with torch.no_grad():
        assert model_logps(copied, seqs).tokens.abs().max() != model_logps(model, seqs).tokens.abs().max()


def test_an_adapted_lm_head_and_fsdp_are_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(PrefError, match="take lm_head out of the adapter's target modules"):
        head_in_float32(model)
    with pytest.raises(PrefError, match="--cast-lm-head-to-fp32 does not work with --fsdp"):
        build_config(flags={"cast_lm_head_to_fp32": True, "fsdp": True})


def test_a_bf16_online_run_samples_and_trains_with_a_float32_head(tmp_path, tiny_model_dir, monkeypatch):
    import pref.train as train_module

    references = []
    build = train_module.build_reference
    monkeypatch.setattr(train_module, "build_reference", lambda *args: references.append(build(*args)) or references[-1])
    config = build_config(flags={"objective": "grpo", "objective_options": {"beta": 0.04}, "reward": "repetition", "model": tiny_model_dir,
                                 "output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                                 "device": "cpu", "dtype": "bfloat16", "cast_lm_head_to_fp32": True, "progress": False})
    out, policy = train_module.train_policy(config, load_registry())
    losses = [json.loads(line)["loss"] for line in open(f"{out}/metrics.jsonl")]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    frozen = references[0].model
    assert policy.model.lm_head.weight.dtype == frozen.lm_head.weight.dtype == torch.float32
    assert frozen.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert frozen.lm_head(torch.ones(1, frozen.config.hidden_size, dtype=torch.bfloat16)).dtype == torch.float32


def test_a_cached_reference_with_a_float32_head_is_cached_apart(tmp_path, tiny_model_dir, prefs_file, private_cache):
    def cached_files():
        return set((private_cache / "reference").glob("*.safetensors")) if (private_cache / "reference").exists() else set()

    seen = []
    for cast in (False, True, True):
        before = cached_files()
        train(build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "reference": "cached", "steps": 1,
                                  "batch_size": 2, "device": "cpu", "dtype": "bfloat16", "cast_lm_head_to_fp32": cast, "progress": False,
                                  "output_dir": str(tmp_path / f"run-{len(seen)}")}), load_registry())
        seen.append(cached_files() - before)
    assert len(seen[0]) == 1 and len(seen[1]) == 1 and seen[0] != seen[1] and not seen[2]  # the third run reads the second's
