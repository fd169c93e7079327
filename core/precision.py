"""Weight dtypes: what `--dtype` loads, and float32 where training needs it.

`--dtype auto` resolves to bfloat16 on a CUDA GPU that supports it when the
checkpoint itself is stored in bfloat16 or float16 (its `torch_dtype`), and to
float32 everywhere else (CPU, MPS, float32 checkpoints): bf16 on a CPU is slow
and saves little there. A low-precision dtype applies to the weights as loaded and
to whatever stays frozen (a LoRA run's base model, a frozen reference copy); the
weights the optimizer updates are kept in float32 (`keep_trainable_in_float32`),
so AdamW's state and its small updates are never rounded to 8 bits of mantissa,
while the forward pass computes in the low precision under autocast.
"""

from __future__ import annotations

import types

import torch

from pref.errors import PrefError
from pref.hub import cache_only

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
#: The accelerate mixed-precision mode that computes in a low-precision dtype.
AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def checkpoint_dtype(path: str) -> torch.dtype | None:
    """The `torch_dtype` a saved model declares (a hub id, a local folder or `pref-default`), or None."""
    from transformers import AutoConfig

    from pref.models import REMOTE_CODE, resolve_model_path

    path = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=cache_only(path), trust_remote_code=REMOTE_CODE.get())
    except (OSError, ValueError):
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return DTYPES.get(dtype) if isinstance(dtype, str) else dtype


def resolve_device(name: str) -> str:
    """`--device NAME` (auto, cpu, cuda, mps) as the device the weights go to: auto takes a CUDA GPU, else MPS, else the CPU.

    A PrefError for a device that is not here.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise PrefError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PrefError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(name: str, device: str, model_path: str | None) -> torch.dtype:
    """The weights' dtype for `--dtype NAME` on `device` (auto, cpu, cuda, mps); PrefError where the device cannot do it."""
    if name not in DTYPE_CHOICES:
        raise PrefError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {name!r}")
    kind = resolve_device(device)  # where the weights end up: cuda, mps or cpu
    if name == "auto":
        bf16_gpu = kind == "cuda" and torch.cuda.is_bf16_supported()  # only there does the stored dtype matter (no hub request elsewhere)
        return torch.bfloat16 if bf16_gpu and model_path and checkpoint_dtype(model_path) in (torch.bfloat16, torch.float16) else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and kind == "cpu":
        raise PrefError("--dtype float16 cannot train on a CPU (no float16 gradient scaling there); use --dtype bfloat16 or float32")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrefError("this GPU cannot compute in bfloat16; use --dtype float16 or float32")
    return dtype


def keep_trainable_in_float32(*modules: torch.nn.Module) -> None:
    """Cast every parameter that requires grad to float32 in place; frozen ones keep their (possibly low-precision) dtype."""
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def head_in_float32(model: torch.nn.Module) -> None:
    """`--cast-lm-head-to-fp32` (TRL's `cast_lm_head_to_fp32`, ScaleRL's recipe): the LM head's weights in float32, and its
    projection computed in float32 outside autocast, so the log-probs and the samples of a low-precision model come from
    float32 logits. A tied input embedding (the same weights) still gives the dtype it gave. In place, before any copy."""
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's model
    head = bare.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise PrefError(f"--cast-lm-head-to-fp32: the LM head of {type(bare).__name__} is a {type(head).__name__}, not a plain linear "
                        "layer (an adapter on lm_head?); take lm_head out of the adapter's target modules, or drop the flag")
    dtype = head.weight.dtype

    def float32_forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), None if self.bias is None else self.bias.float())

    head.float().forward = types.MethodType(float32_forward, head)  # bound to the module: a deep copy (the reference's) is bound to its own
    embedding = bare.get_input_embeddings()
    if embedding is not None and embedding.weight is head.weight and dtype != torch.float32:
        embedding.register_forward_hook(lambda module, args, out: out.to(dtype))
