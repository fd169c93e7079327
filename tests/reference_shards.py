"""A step of distributed_runs.py: `{"main": "reference_shards", "args": [REPORT, *PREF_ARGS]}` runs `pref PREF_ARGS`
and writes REPORT.RANK.json: what this process's frozen reference held at each of its forwards.

For each `FrozenReference.logps` and `hidden_states` call: the parameter bytes the process held (a sharded model's local pieces),
the bytes of the whole model, and the bytes left gathered whole after the call.
"""

import json

import torch
import torch.distributed as dist


def held_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes this process holds, bytes of the whole model, bytes gathered whole right now) of `model`'s parameters."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params)
    whole = sum(p.numel() * p.element_size() for p in params)
    return held, whole, sum(p.nbytes for p in params if not isinstance(p, DTensor))


def main(report: str, *args: str) -> None:
    from pref.cli.main import cli
    from pref.reference import FrozenReference

    forwards = []
    methods = {name: getattr(FrozenReference, name) for name in ("logps", "hidden_states")}

    def noting(method):
        def noted(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            held, whole, _ = held_bytes(self.model)
            forwards.append({"held": held, "whole": whole, "gathered_after": held_bytes(self.model)[2]})
            return out
        return noted

    for name, method in methods.items():
        setattr(FrozenReference, name, noting(method))
    try:
        cli(list(args), prog_name="pref", standalone_mode=False)
    finally:
        for name, method in methods.items():
            setattr(FrozenReference, name, method)
    with open(f"{report}.{dist.get_rank()}.json", "w") as f:
        json.dump(forwards, f)
