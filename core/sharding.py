"""Sharded training with torch's FSDP2 (`fully_shard`): `--fsdp`, and whole tensors for checkpoints.

accelerate 1.15 turns its own FSDP on only for GPU-like devices, never for CPU processes,
so `--fsdp` shards here, on CPU (gloo) and GPU (NCCL) processes alike: each decoder layer,
then the whole model, after the reference was taken from the whole model (a frozen copy of it is
sharded the same way, `FrozenReference.shard`). accelerate then
does not wrap the model in DDP: FSDP2 averages the gradients itself. Weights and optimizer
state go into checkpoints whole (`whole`) and come back sharded (`sharded_like`), so the
files are those of an unsharded run. These also serve a model accelerate sharded itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pref.errors import PrefError
from pref.interfaces import MOVING_OPTIONS


def refuse_unsupported(config: Any, world: int, distributed_type: str, online: bool, moves_reference: bool) -> None:
    """A `PrefError` for a sharded run (`--fsdp`, or accelerate's FSDP) that cannot work, or that pref has not tested sharded.

    `distributed_type`: accelerate's (`accelerator.distributed_type`: "FSDP", "DEEPSPEED", "MULTI_GPU", ...).
    """
    if distributed_type == "DEEPSPEED":  # its partitioned weights would reach checkpoints and final/ empty
        raise PrefError("DeepSpeed is not supported: pref's checkpoints do not gather its partitioned weights and optimizer "
                        "state; shard with --fsdp instead (accelerate launch without a DeepSpeed config)")
    by_accelerate = distributed_type == "FSDP"
    if not (config.fsdp or by_accelerate):
        return
    if config.fsdp and world < 2:
        raise PrefError("--fsdp shards the model over several processes: start it with accelerate launch --num_processes N (N >= 2), "
                        "or drop --fsdp")
    if config.fsdp and by_accelerate:
        raise PrefError("--fsdp and an accelerate config with FSDP both shard the model: drop one of them")
    sharding = "--fsdp" if config.fsdp else "accelerate's FSDP"
    # pref's own sharded model generates (every process together); accelerate's wraps it where pref's generation cannot reach
    untested = [name for name, used in [("online objectives", online and by_accelerate), ("--test-prompt", config.test_prompts and by_accelerate),
                ("--merge-lora", config.merge_lora and by_accelerate), ("--quantize", config.quantize and by_accelerate), (f"a moving reference ({MOVING_OPTIONS})", moves_reference and by_accelerate)] if used]
    if untested:
        raise PrefError(f"{sharding} does not support {untested[0]} yet: run it unsharded (DDP), or drop it")


def shard(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Apply FSDP2 in place to process 0's weights: each decoder layer (the model's `_no_split_modules`), then the whole model.

    Weights in a low-precision `dtype` compute in it; the sharded weights the optimizer
    updates stay float32 (`keep_trainable_in_float32` ran before) and gradients average in float32.
    A frozen model (the reference's copy) is sharded the same way and keeps the dtype it was loaded in.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # each process keeps its piece of its own copy: start all from process 0's, as DDP does (LoRA's random init)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    precision = MixedPrecisionPolicy() if dtype == torch.float32 else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layer_names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    for module in [m for m in model.modules() if type(m).__name__ in layer_names]:
        fully_shard(module, mp_policy=precision)
    fully_shard(model, mp_policy=precision)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def no_gradient_sync(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients without averaging them across processes (DDP or FSDP2)."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def gathered_for_generation(model: torch.nn.Module, whole: bool = True) -> Iterator[None]:
    """A sharded model ready for a `generate` call; sharded again after. A collective (every process enters it together).

    `whole`: each layer's weights are gathered once for the call, instead of at every token, so each process holds
    the whole model's weights while it samples. Otherwise (`--sample-sharded`) each layer is gathered at each forward
    and freed after it, FSDP2's default: slower, but a process holds only the root's own weights (embeddings,
    LM head) and one layer's whole at a time.
    """
    if not is_sharded(model):
        yield
        return
    # FSDP2 makes its root at the first forward through it, which a PeftModel's generate skips (it calls the model inside)
    model._get_fsdp_state()._lazy_init()
    layers = [m for m in model.modules() if is_sharded(m) and m is not model] if whole else []
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    model.unshard()  # the root's own weights (embeddings, LM head), gathered before any forward asks for them
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
            layer.reshard()  # training gathers one layer at a time again
        model.reshard()


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's state dict gathered whole onto the CPU of process 0 (the others get {}): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[torch.nn.Parameter, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # tied weights stay one tensor, as save_pretrained expects
        if name in state:
            state[name] = state[first.setdefault(param, name)]
    return state


def whole(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """`tensor` on the CPU, gathered from every process if it is sharded (a collective); None unless `keep`."""
    from torch.distributed.tensor import DTensor

    tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return tensor.detach().cpu() if keep else None


def sharded_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole `tensor` cut as `like` is (each process keeps its own piece); `tensor` itself if `like` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def whole_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """`optimizer.state_dict()` with sharded state gathered: what an unsharded run's optimizer saves (a collective).

    Where not `keep` (a process that does not write) each gathered tensor is dropped at once.
    """
    state = optimizer.state_dict()
    return {**state, "state": {index: {key: whole(v, keep) if isinstance(v, torch.Tensor) else v for key, v in values.items()}
                               for index, values in state["state"].items()}}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state (an unsharded run's), cutting each tensor as its parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_index = dict(zip([index for group in state["param_groups"] for index in group["params"]], params))
    pieces = {index: {key: sharded_like(v, by_index[index]) if isinstance(v, torch.Tensor) and v.dim() else v for key, v in values.items()}
              for index, values in state["state"].items()}
    optimizer.load_state_dict({**state, "state": pieces})
