"""Mixture-of-Experts models: their load-balancing loss joins every training loss, as TRL's trainers add it."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from pref.config import build_config
from pref.errors import PrefError
from pref.packing import packed_layout
from pref.registry import load_registry
from pref.sequences import Sequences, model_logps, router_loss_coef
from pref.train import train

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def peaky(model):
    """Routers far from uniform (at random init every token spreads evenly, and any set of tokens balances alike)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):
                p.mul_(50)
    return model


MOE = {
    "mixtral": lambda vocab: MixtralForCausalLM(MixtralConfig(vocab_size=vocab, **SMALL, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda vocab: Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=vocab, **SMALL, num_experts=4, num_experts_per_tok=2,
                                                                  moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "olmoe": lambda vocab: OlmoeForCausalLM(OlmoeConfig(vocab_size=vocab, **SMALL, num_experts=4, num_experts_per_tok=2)),
}


def uneven_rows(vocab: int) -> Sequences:
    """Five right-padded rows of 9, 3, 6, 2 and 4 real tokens: packed into fewer rows, with padding after some."""
    lengths = [9, 3, 6, 2, 4]
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    completion = mask.clone()
    completion[:, :1] = 0
    return Sequences(ids * mask, mask, completion)


@pytest.mark.parametrize("kind", sorted(MOE))
def test_the_router_loss_is_the_models_own_padded_and_packed(kind):
    torch.manual_seed(0)
    model = peaky(MOE[kind](300)).train()
    rows = uneven_rows(300)
    own = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, output_router_logits=True).aux_loss
    assert packed_layout(model, rows.input_ids, rows.attention_mask) is not None  # the packed path is taken
    padded = model_logps(model, rows, with_router_loss=True)
    packed = model_logps(model, rows, with_router_loss=True, packing=True)
    torch.testing.assert_close(padded.router_loss, own)
    torch.testing.assert_close(packed.router_loss, own)  # over the real tokens, not the packed rows' padding
    torch.testing.assert_close(packed.tokens, padded.tokens)
    layout = packed_layout(model, rows.input_ids, rows.attention_mask)
    with_padding = model(input_ids=layout.input_ids, position_ids=layout.position_ids, output_router_logits=True).aux_loss
    assert (with_padding - own).abs() > 1e-4  # what taking the padding along would give
    packed.router_loss.backward()  # the loss trains the routers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name.endswith(".gate.weight"))
    assert model_logps(model, rows).router_loss is None and padded.select([0, 1]).router_loss is None


def test_the_weight_is_the_models_own_unless_given_and_a_dense_model_refuses_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    moe, dense = MOE["olmoe"](300), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert router_loss_coef(moe, None) == 0.01 and router_loss_coef(moe, 0.5) == 0.5 and router_loss_coef(moe, 0.0) == 0.0
    assert router_loss_coef(dense, None) == 0.0 and router_loss_coef(dense, 0.0) == 0.0
    with pytest.raises(PrefError, match="not a Mixture-of-Experts model.*drop --router-aux-loss-coef"):
        router_loss_coef(dense, 0.01)
    with pytest.raises(PrefError, match="router_aux_loss_coef must be zero"):
        build_config(flags={"router_aux_loss_coef": -1.0})


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Mixtral with the default model's tokenizer, as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-moe")
    torch.manual_seed(0)
    peaky(MOE["mixtral"](AutoConfig.from_pretrained(tiny_model_dir).vocab_size)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


def first_step(tmp_path, model, prefs_file, name, **flags):
    config = build_config(flags={"objective": "dpo", "model": model, "dataset": [prefs_file], "output_dir": str(tmp_path / name), "steps": 1,
                                 "batch_size": 2, "device": "cpu", "lr": 1e-2, "progress": False, **flags})
    with open(f"{train(config, load_registry())}/metrics.jsonl") as f:
        return json.loads(f.readline())


@pytest.mark.parametrize("packing", [True, False])
def test_a_dpo_step_adds_the_weighted_router_loss_to_its_loss(tmp_path, tiny_moe_dir, prefs_file, packing):
    """The loss logged is DPO's plus coef x the router loss (TRL's `aux_loss`), whose gradient moves the routers."""
    off = first_step(tmp_path, tiny_moe_dir, prefs_file, "off", router_aux_loss_coef=0.0, packing=packing)
    default = first_step(tmp_path, tiny_moe_dir, prefs_file, "default", packing=packing)  # Mixtral's own: 0.001
    heavy = first_step(tmp_path, tiny_moe_dir, prefs_file, "heavy", router_aux_loss_coef=2.0, packing=packing)
    assert "aux_loss" not in off and default["aux_loss"] == pytest.approx(heavy["aux_loss"]) and heavy["aux_loss"] > 1
    assert default["loss"] == pytest.approx(off["loss"] + 0.001 * default["aux_loss"], abs=1e-6)
    assert heavy["loss"] == pytest.approx(off["loss"] + 2.0 * heavy["aux_loss"], abs=1e-6)
    assert heavy["grad_norm"] != pytest.approx(off["grad_norm"])


def test_a_dense_model_with_a_router_weight_is_a_one_line_error(tmp_path, tiny_model_dir, prefs_file):
    with pytest.raises(PrefError, match="not a Mixture-of-Experts model"):
        first_step(tmp_path, tiny_model_dir, prefs_file, "dense", router_aux_loss_coef=0.01)
