"""Packed forwards (rows back to back, no padding) give the padded path's log-probs and gradients."""

import json
import logging
import os

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import pref.sequences as sequences_module
from pref import packing
from pref.cli.main import cli
from pref.config import build_config
from pref.errors import PrefError
from pref.models import quiet_peft
from pref.plugins.lora import Lora
from pref.sequences import Sequences, model_logps

VOCAB = 97
LENGTHS = [40, 6, 17, 9, 31, 3]  # -> packed rows [40], [31, 9], [17, 6, 3]: 3 rows instead of 6


def tiny_llama(seed=0, cls=LlamaForCausalLM, **config):
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config_cls = MistralConfig if cls is MistralForCausalLM else LlamaConfig
    return cls(config_cls(**{**settings, **config})).train()


def uneven_rows(lengths=LENGTHS, extra_padding=3, seed=1):
    """Right-padded rows of the given lengths, the first 2 tokens of each a prompt."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_padding
    attention = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator) * attention
    completion = attention.clone()
    completion[:, :2] = 0
    return Sequences(ids, attention, completion)


def forward_rows(model):
    """Records the rows of each forward of `model`'s body: [(rows, width, had position_ids)]."""
    seen = []
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    body.register_forward_pre_hook(lambda m, args, kwargs: seen.append((*kwargs["input_ids"].shape, kwargs.get("position_ids") is not None)),
                                   with_kwargs=True)
    return seen


def grads(model, value):
    model.zero_grad()
    value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_plan_is_first_fit_decreasing_by_length():
    # by length: 9 (row 1), 6 (3), 5 (5), 4 (2), 3 (0), 2 (4); each goes into the first packed row with room
    assert packing.packing_plan([3, 9, 4, 6, 2, 5], width=9) == [[1], [3, 0], [5, 2], [4]]
    assert packing.packing_plan([2, 2, 2], width=4) == [[0, 1], [2]]  # ties keep row order
    assert packing.packing_plan([5, 0, 5], width=5) == [[0], [2]]  # an empty row goes nowhere
    assert packing.packing_plan(LENGTHS, width=40) == [[0], [4, 3], [2, 1, 5]]


def test_a_packed_row_restarts_positions_at_each_sequence_and_unpacks_back():
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 0, 0, 0], [8, 9, 3, 4, 0]])
    layout = packing.pack(ids, [3, 2, 4], packing.packing_plan([3, 2, 4], width=4))
    assert layout.input_ids.tolist() == [[8, 9, 3, 4], [5, 6, 7, 0], [1, 2, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]  # padding restarts too
    assert torch.equal(layout.unpack(layout.input_ids), ids)  # zeros where the rows were padded
    assert packing.right_padded_lengths(torch.tensor([[1, 1, 0], [1, 0, 0]])) == [2, 1]
    assert packing.right_padded_lengths(torch.tensor([[0, 1, 1], [1, 0, 0]])) is None  # left padding: never packed


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(gradient_checkpointing):
    model = tiny_llama()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    seqs = uneven_rows()
    assert packing.packs_correctly(model)
    seen = forward_rows(model)
    padded = model_logps(model, seqs)
    padded_grads = grads(model, (padded.sequence * torch.linspace(-1, 2, len(LENGTHS))).sum())
    seen.clear()
    packed = model_logps(model, seqs, packing=True)
    packed_grads = grads(model, (packed.sequence * torch.linspace(-1, 2, len(LENGTHS))).sum())

    assert seen == [(3, 40, True)]  # one forward of 3 packed rows as wide as the longest row
    assert_close(packed.tokens, padded.tokens, atol=1e-5, rtol=0)
    assert_close(packed.sequence, padded.sequence, atol=1e-5, rtol=0)
    assert torch.equal(packed.mask, padded.mask)
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rows_that_cannot_share_a_row_take_the_padded_path():
    model = tiny_llama()
    seqs = uneven_rows([10, 9, 8])  # no two fit in 10 tokens
    seen = forward_rows(model)
    packing.packs_correctly(model)
    model_logps(model, seqs, packing=True)
    assert seen[-1] == (3, 13, False)


class IgnoresPositionIds(LlamaForCausalLM):
    """A model that, like some remote code, drops the position_ids it is given."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_ignores_position_ids_is_probed_once_and_never_packed(caplog):
    model = tiny_llama(cls=IgnoresPositionIds)
    seqs = uneven_rows()
    seen = forward_rows(model)
    with caplog.at_level(logging.INFO, logger="pref.packing"):
        with torch.no_grad():
            packed = model_logps(model, seqs, packing=True)
            model_logps(model, seqs, packing=True)
            padded = model_logps(model, seqs)
    assert packing.packs_correctly(model) is False
    assert sum("packed forwards are off for IgnoresPositionIds" in r.message for r in caplog.records) == 1
    assert seen[3:] == [(6, 43, False)] * 3  # after the probe's 3 forwards: padded rows only
    assert_close(packed.sequence, padded.sequence, atol=1e-5, rtol=0)


def test_a_sliding_window_shorter_than_the_rows_is_not_packed():
    model = tiny_llama(cls=MistralForCausalLM, sliding_window=16)
    seqs = uneven_rows()
    seen = forward_rows(model)
    with torch.no_grad():
        packed = model_logps(model, seqs, packing=True)
        padded = model_logps(model, seqs)
    assert packing.packs_correctly(model) and seen[-2:] == [(6, 43, False)] * 2
    assert_close(packed.sequence, padded.sequence, atol=1e-5, rtol=0)


def test_a_window_only_counts_where_a_layer_attends_through_it():
    """Qwen2-MoE sets `sliding_window` to 0 with `use_sliding_window` off (Qwen1.5-MoE's config too): its layers are all full
    attention, and its rows pack; Qwen2 with the window on does not."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    seqs = uneven_rows()
    unused = Qwen2MoeForCausalLM(Qwen2MoeConfig(**settings, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                sliding_window=16, use_sliding_window=False))
    used = Qwen2ForCausalLM(Qwen2Config(**settings, sliding_window=16, use_sliding_window=True, max_window_layers=0))
    assert unused.config.sliding_window == 0 and set(unused.config.layer_types) == {"full_attention"}
    assert packing.packed_layout(unused, seqs.input_ids, seqs.attention_mask) is not None
    assert packing.packed_layout(used, seqs.input_ids, seqs.attention_mask) is None


def test_an_encoder_decoder_config_is_never_packed():
    model = tiny_llama()
    model.config.is_encoder_decoder = True
    assert not packing.may_pack(model)


def test_a_lora_model_packs_and_matches_its_padded_log_probs_and_gradients():
    adapter = Lora(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    with quiet_peft():
        model = adapter.wrap(tiny_llama(), "causal-lm")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(3))
    seqs = uneven_rows()
    assert packing.packs_correctly(model)
    seen = forward_rows(model)
    padded = model_logps(model, seqs)
    padded_grads = grads(model, padded.sequence.sum())
    seen.clear()
    packed = model_logps(model, seqs, packing=True)
    packed_grads = grads(model, packed.sequence.sum())
    assert seen == [(3, 40, True)]  # peft passed the position_ids through
    assert_close(packed.sequence, padded.sequence, atol=1e-5, rtol=0)
    assert padded_grads and all("lora_" in name for name in padded_grads)
    for name in padded_grads:
        assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_is_a_boolean_setting():
    assert build_config(flags={"objective": "dpo"}).packing is True
    assert build_config(flags={"objective": "dpo", "packing": False}).packing is False
    with pytest.raises(PrefError, match="packing must be true or false"):
        build_config(file_values={"packing": "yes"})


def test_a_dpo_run_gives_the_same_losses_packed_and_padded(tmp_path, tiny_model_dir, monkeypatch):
    rows = [{"prompt": f"Question {i}?", "chosen": " ".join(["long answer with many words"] * (2 + i)), "rejected": "No."} for i in range(6)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    packed_forwards = []
    original = sequences_module.packed_logps

    def counting(model, sequences, *args):
        out = original(model, sequences, *args)
        packed_forwards.append(out is not None)
        return out

    monkeypatch.setattr(sequences_module, "packed_logps", counting)
    losses = {}
    for flag in ("--packing", "--no-packing"):
        before = len(packed_forwards)
        out = str(tmp_path / flag)
        result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--model", tiny_model_dir, "--dataset", str(data), "--steps", "3",
                                          "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--output-dir", out, flag])
        assert result.exit_code == 0, (result.output, result.exception)
        losses[flag] = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
        if flag == "--packing":
            assert sum(packed_forwards) >= 3  # the reference's precompute and the training steps packed
        else:
            assert len(packed_forwards) == before
    assert len(losses["--packing"]) == 3
    assert losses["--packing"] == pytest.approx(losses["--no-packing"], abs=1e-5)


def _ddp_worker(rank, world, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_llama()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    seqs = uneven_rows() if rank == 0 else uneven_rows([10, 9, 8])  # one process packs, the other cannot
    seen = forward_rows(model)
    for _ in range(2):
        wrapped.zero_grad()
        model_logps(wrapped, seqs, packing=True).sequence.sum().backward()
    plain = tiny_llama()
    expected = torch.autograd.grad(model_logps(plain, seqs).sequence.sum(), list(plain.parameters()))
    for tensor in expected:
        dist.all_reduce(tensor)
        tensor /= world
    difference = max((p.grad - e).abs().max().item() for p, e in zip(model.parameters(), expected))
    results[rank] = (seen[-1], difference)
    dist.barrier()
    # leave without tearing gloo down: freeing the DDP wrapper's process group can deadlock,
    # its worker thread waiting for the GIL that the freeing thread holds
    os._exit(0)


@pytest.mark.slow
def test_under_ddp_a_packed_and_a_padded_process_average_the_right_gradients():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2)
    assert results[0][0] == (3, 40, True) and results[1][0] == (3, 13, False)
    assert results[0][1] < 1e-5 and results[1][1] < 1e-5
