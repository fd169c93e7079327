"""Checkpoints: written to a temporary folder and renamed into place, last K kept.

A checkpoint folder `checkpoint-000100/` holds the files named below. A
reader never sees a half-written checkpoint: the folder only appears, by an
atomic rename, once every file in it is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from pref.errors import PrefError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
EXTRA_FILE = "extra.pt"  # objective-owned state (value heads, discriminators, ...)
RNG_FILE = "rng-{rank}.pt"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(path: str, write: Any) -> None:
    """Call `write(tmp_path)`, then rename the result to `path` (a file or a folder)."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints in `run_dir`, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := PATTERN.match(name))]
    return [os.path.join(run_dir, name) for _, name in sorted(found)]


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write checkpoint `step` atomically and delete all but the newest `keep`.

    `rng_states` holds every process's random state, index = process rank.
    """
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = os.path.join(run_dir, f".tmp-checkpoint-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, MODEL_FILE))
    torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
    torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
    for rank, rng in enumerate(rng_states):
        torch.save(rng, os.path.join(tmp, RNG_FILE.format(rank=rank)))
    if extra:
        torch.save(extra, os.path.join(tmp, EXTRA_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({**state, "step": step}, f, indent=2)
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step saved again: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str) -> str:
    """`path` is a checkpoint folder or a run folder (its newest checkpoint is used)."""
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise PrefError(f"no checkpoint in {path}; pass a run folder that has checkpoint-* folders (save them with --save-every N)")
    return found[-1]


def load_checkpoint(
    checkpoint_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights, optimizer, scheduler and this process's RNG; return (state, extra)."""
    load_model(model, os.path.join(checkpoint_dir, MODEL_FILE))
    optimizer.load_state_dict(torch.load(os.path.join(checkpoint_dir, OPTIMIZER_FILE), weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(checkpoint_dir, SCHEDULER_FILE), weights_only=False))
    rng_path = os.path.join(checkpoint_dir, RNG_FILE.format(rank=rank))
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    extra_path = os.path.join(checkpoint_dir, EXTRA_FILE)
    extra = torch.load(extra_path, weights_only=False) if os.path.exists(extra_path) else None
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f), extra


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
