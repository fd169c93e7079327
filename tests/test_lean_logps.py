"""Lean log-probs (LM head at completion positions only, in chunks) equal the full-logits path."""

import pytest
import torch
from torch.testing import assert_close

import pref.sequences as sequences_module
from pref.policy import HFPolicy
from pref.sequences import logps_from_logits, model_logps

PROMPTS = ["Name a fruit.", "What is your name? Tell me more about you.", "Say something kind."]
ANSWERS = ["apple", "i am tiny , a small helpful assistant .", "you are a good friend ."]


def plain_logps(model, seqs):
    """Today's path: the model's full [B, T, V] logits, then gather and normalise."""
    out = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, output_hidden_states=True)
    logps = logps_from_logits(out.logits, seqs)
    logps.hidden = out.hidden_states[-1]
    return logps


def grads(model, value):
    model.zero_grad()
    value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_elements", [2**24, 7 * 1])  # one chunk, and chunks of a few rows
def test_lean_logps_equal_the_full_logits_path_with_gradients(tiny_model_dir, monkeypatch, chunk_elements):
    policy = HFPolicy.load(tiny_model_dir)
    # float64 weights: the two paths sum the tied embedding's gradient over chunks in another
    # order, and in float32 that alone moves elements by ~2e-4 (of values up to ~14)
    model = policy.model.double().train()
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(sequences_module, "LOGIT_CHUNK_ELEMENTS", chunk_elements * vocab)
    seqs = policy.encode(PROMPTS, ANSWERS)
    assert (seqs.attention_mask == 0).any()  # padding is present

    torch.manual_seed(0)
    plain = plain_logps(model, seqs)
    plain_grads = grads(model, (plain.sequence * torch.tensor([1.0, -2.0, 0.5])).sum() + plain.hidden.pow(2).mean())
    torch.manual_seed(0)
    lean = model_logps(model, seqs, with_hidden=True)
    lean_grads = grads(model, (lean.sequence * torch.tensor([1.0, -2.0, 0.5])).sum() + lean.hidden.pow(2).mean())

    assert lean.logits is None
    assert_close(lean.tokens, plain.tokens, atol=1e-5, rtol=0)
    assert_close(lean.sequence, plain.sequence, atol=1e-5, rtol=0)
    assert torch.equal(lean.mask, plain.mask)
    assert_close(lean.hidden, plain.hidden, atol=1e-5, rtol=0)
    assert plain_grads.keys() == lean_grads.keys()
    for name in plain_grads:
        assert_close(lean_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lean_logps_never_compute_logits_for_every_position(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    seqs = policy.encode(PROMPTS, ANSWERS)
    rows_seen = []
    head = policy.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: rows_seen.append(out.reshape(-1, out.shape[-1]).shape[0]))
    try:
        with torch.no_grad():
            policy.logps(seqs)
    finally:
        handle.remove()
    completion_tokens = int(seqs.completion_mask.sum())
    # the model's own call at one position per row, then exactly the completion positions
    assert rows_seen == [len(seqs), completion_tokens]
    assert completion_tokens < seqs.input_ids.numel()


def test_with_logits_keeps_the_full_path(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    seqs = policy.encode(PROMPTS, ANSWERS)
    with torch.no_grad():
        full = policy.logps(seqs, with_logits=True)
        lean = policy.logps(seqs)
    assert full.logits.shape == (*seqs.input_ids.shape, policy.model.config.vocab_size)
    assert_close(full.sequence, lean.sequence, atol=1e-5, rtol=0)


def test_a_batch_without_completion_tokens_still_backpropagates_zeros(tiny_model_dir):
    """Every completion masked out (GRPO's mask_truncated_completions when the limit cut them all): zero log-probs whose
    backward gives every weight a zero gradient, as the full-logits path does, instead of an error (or DDP waiting)."""
    from pref.sequences import Sequences

    policy = HFPolicy.load(tiny_model_dir)
    model = policy.model.train()
    seqs = policy.encode(PROMPTS, ANSWERS)
    masked = Sequences(seqs.input_ids, seqs.attention_mask, torch.zeros_like(seqs.completion_mask))
    lean = model_logps(model, masked)
    assert torch.equal(lean.tokens, torch.zeros_like(lean.tokens))
    gradients = grads(model, lean.sequence.sum())
    assert gradients.keys() == grads(model, plain_logps(model, masked).sequence.sum()).keys()
    assert all(float(g.abs().max()) == 0 for g in gradients.values())


@pytest.mark.parametrize("packing", [False, True])
def test_entropies_from_the_lean_chunks_equal_the_full_logits(tiny_model_dir, monkeypatch, packing):
    """GRPO's top_entropy_quantile reads each completion token's entropy: from the lean path's chunks (a few rows each
    here), packed or not, it is the full distribution's -sum p log p, without the [B, T, V] logits."""
    policy = HFPolicy.load(tiny_model_dir)
    model = policy.model.double().train()
    monkeypatch.setattr(sequences_module, "LOGIT_CHUNK_ELEMENTS", 5 * model.get_output_embeddings().weight.shape[0])
    seqs = policy.encode(PROMPTS, ANSWERS)
    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits[:, :-1]
    by_hand = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)  # position t - 1 drew token t
    mask = seqs.completion_mask.clone()
    mask[:, 0] = 0
    expected = torch.nn.functional.pad(by_hand, (1, 0)) * mask
    lean = model_logps(model, seqs, packing=packing, with_entropy=True)
    full = model_logps(model, seqs, with_logits=True, with_entropy=True)
    assert lean.logits is None and lean.entropy is not None and lean.entropy.requires_grad
    assert_close(lean.entropy.double(), expected, atol=5e-5, rtol=0)  # both compute in float32
    assert_close(full.entropy.double(), expected, atol=5e-5, rtol=0)
    # and their gradients: the entropy bonus (entropy_coef) trains through them
    weights = torch.rand(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(grads(model, (lean.entropy.double() * weights).sum()), grads(model, (expected * weights).sum()), atol=1e-4, rtol=1e-3)
    assert_close(lean.tokens, model_logps(model, seqs, packing=packing).tokens)  # the log-probs as without it
    assert model_logps(model, seqs).entropy is None


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("kind, settings, scale", [
    ("cohere", {"logit_scale": 0.25}, 0.25),  # Command R: the head's output times logit_scale
    ("granite", {"logits_scaling": 4.0}, 0.25),  # Granite: divided by logits_scaling
    ("falcon_h1", {"lm_head_multiplier": 0.3}, 0.3),
    ("hyperclovax", {"logits_scaling": 0.5}, 0.5),  # HyperCLOVA X: times logits_scaling
    ("minicpm3", {"dim_model_base": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "q_lora_rank": 16, "kv_lora_rank": 16,
                  "num_key_value_heads": 4}, 1.0),  # divides the head's input by 32 / 8 = 4: the lean path is handed it so
    ("gemma2", {"final_logit_softcapping": 3.0, "head_dim": 8}, 1.0),  # soft-capped
])
def test_lean_logps_scale_the_head_output_as_the_model_does(kind, settings, scale, monkeypatch):
    """Architectures that scale or cap their LM head's output: the lean path computes their log-probs, not Llama's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pref.sequences import Sequences, head_output_scale

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**TINY, **settings})).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(8)  # logits far from 0, so that scaling them changes the log-probs
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    seqs = Sequences(ids, torch.ones_like(ids), completion)
    assert head_output_scale(model.config.get_text_config()) == pytest.approx(scale)
    full = model_logps(model, seqs, with_logits=True)
    assert_close(model_logps(model, seqs).tokens, full.tokens, atol=1e-5, rtol=1e-5)
    if scale != 1.0:  # the check can fail: without the scale the lean path gives other numbers
        monkeypatch.setattr(sequences_module, "head_output_scale", lambda config: 1.0)
        assert (model_logps(model, seqs).tokens - full.tokens).abs().max() > 1e-2
