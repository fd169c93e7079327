"""FSDP2 in one process (a gloo group of one): what `--fsdp` does to the frozen reference and to sampling, without a
second process. Each parameter a sharded model holds is a DTensor shard until FSDP2 gathers it into a plain tensor
for a forward, so which weights are held whole at any moment can be read even with one process (whose shard is all)."""

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pref.interfaces import SamplingConfig
from pref.policy import HFPolicy
from pref.reference import FrozenReference
from pref.sharding import shard


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gathered(model: torch.nn.Module) -> list[str]:
    """The names of `model`'s parameters held whole right now (not as their shards)."""
    return [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]


def test_a_sharded_frozen_reference_gives_the_whole_copys_logps_and_keeps_nothing_gathered(tiny_model_dir, process_group):
    policy = HFPolicy.load(tiny_model_dir)
    rows = policy.encode(["Name a fruit.", "What color is the sky?"], ["apple", "The sky is blue."])
    whole, sharded = FrozenReference.copy_of(policy.model, packing=True), FrozenReference.copy_of(policy.model, packing=True)
    sharded.shard(torch.float32)
    assert gathered(sharded.model) == []
    for with_logits in (False, True):  # the lean (packed) path, whose LM head runs after the forward, and full distributions
        expected, got = whole.logps(rows, with_logits), sharded.logps(rows, with_logits)
        torch.testing.assert_close(got.tokens, expected.tokens, atol=1e-6, rtol=0)
        assert gathered(sharded.model) == []  # FSDP2 would keep the embeddings and LM head gathered, waiting for a backward
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in sharded.model.parameters())


def test_sample_sharded_gathers_one_layer_at_a_time_and_samples_the_same_ids(tiny_model_dir, process_group):
    policy = HFPolicy.load(tiny_model_dir, max_prompt_length=32)
    layers = [m for m in policy.model.modules() if type(m).__name__ in policy.model._no_split_modules]
    shard(policy.model, torch.float32)
    whole_layers = {"most": 0}

    def count(module, inputs):  # after FSDP2's own pre-forward hook gathered what this layer needs
        whole_layers["most"] = max(whole_layers["most"], sum(not isinstance(next(m.parameters()), DTensor) for m in layers))

    for layer in layers:
        layer.register_forward_pre_hook(count)
    ids, most = {}, {}
    for sample_sharded in (False, True):
        policy.sample_sharded, whole_layers["most"] = sample_sharded, 0
        torch.manual_seed(0)
        ids[sample_sharded] = policy.sample(["Name a fruit.", "Say something kind."], 2, SamplingConfig(max_new_tokens=6)).sequences.input_ids
        most[sample_sharded] = whole_layers["most"]
        assert gathered(policy.model) == []  # sharded again for training
    assert len(layers) > 1 and most == {False: len(layers), True: 1}
    assert torch.equal(ids[True], ids[False])
