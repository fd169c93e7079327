"""`--activation-offloading` (TRL's `activation_offloading`): the activations a forward keeps for its backward wait in CPU
memory instead of the accelerator's, and come back when the backward needs them: long sequences on one GPU, for the
time of the copies. With `--gradient-checkpointing` only the checkpointed layers' inputs are kept, and so moved."""

from __future__ import annotations

import torch

from pref.errors import PrefError

#: Devices whose tensors stay where they are: the CPU has no memory of its own to spare (a test empties it).
STAYS_ON = ("cpu",)


class OffloadedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Inside it, each tensor a forward with grad saves for its backward is copied to CPU memory (pinned on CUDA, so that the
    copies run beside the kernels, on the same stream) and back in the backward; not the weights of `model` (a weight saved
    for a backward is no activation, and stays in its place), nor a tensor under `min_bytes` (TRL's 1 KiB), nor one on a
    device of `STAYS_ON`. `offloaded` counts the bytes moved since it was made.
    """

    def __init__(self, model: torch.nn.Module, min_bytes: int = 1024):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.offloaded = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor | tuple[torch.device, torch.Tensor]:
            size = tensor.numel() * tensor.element_size()
            if (tensor.device.type in STAYS_ON or tensor.layout != torch.strided or size < min_bytes or isinstance(tensor, torch.nn.Parameter)
                    or tensor.untyped_storage().data_ptr() in weights):
                return tensor
            try:
                copy = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
                copy.copy_(tensor, non_blocking=True)
            except RuntimeError as exc:  # the CPU's (pinned) memory ran out
                raise PrefError(f"--activation-offloading: CPU memory could not take {self.offloaded + size:,} bytes of activations "
                                f"({(str(exc).splitlines() or [''])[0]}); add --gradient-checkpointing (fewer are kept), lower "
                                "--batch-size or --max-length, or drop --activation-offloading") from None
            self.offloaded += size
            return tensor.device, copy

        def unpack(packed: torch.Tensor | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, copy = packed
            return copy.to(device, non_blocking=True)

        super().__init__(pack, unpack)
