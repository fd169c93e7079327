"""Checkpoints: written to a temporary folder and renamed into place, last K kept.

A checkpoint folder `checkpoint-000100/` holds the files named below. A
reader never sees a half-written checkpoint: the folder only appears, by an
atomic rename, once every file in it is complete.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pref.errors import PrefError
from pref.interfaces import MOVING_OPTIONS
from pref.sharding import is_sharded, load_optimizer_state, sharded_like, whole, whole_optimizer_state, whole_state_dict

# what a checkpoint folder holds; `save_checkpoint` and `load_checkpoint` write and read exactly these
MODEL_FILE = "model.safetensors"  # the policy's trained weights (all of a full run's, a LoRA run's adapters)
OPTIMIZER_FILE = "optimizer.pt"  # the policy's optimizer (and the objective's modules')
SCHEDULER_FILE = "scheduler.pt"
REFERENCE_FILE = "reference.safetensors"  # a reference model the objective moves (TR-DPO, BEMA): all its parameters, and
REFERENCE_STATE = "state/"  # under this prefix, what decides how it moves on (`Objective.reference_state`)
STATE_FILE = "state.json"  # step, seed, number of processes, data position, whether the step was evaluated, tokens trained on
RNG_FILE = "rng-{rank}.pt"  # each process's random state
EXTRA_FILE = "extra.pt"  # the keys below
MODULES = "modules"  # name -> state dict of each of the objective's trainable modules
SECOND_MODEL = "second_model"  # the objective's second model (a state dict), or None
SECOND_OPTIMIZER = "second_optimizer"  # its optimizer's state dict, or None
OBJECTIVE = "objective"  # each process's `Objective.state_dict()`, by rank
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain data, so they load with `weights_only=True`."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(path: str, write: Any) -> None:
    """Call `write(tmp_path)`, then rename the result to `path` (a file or a folder), replacing an earlier one.

    If `write` fails, its temporary copy is removed and a full or read-only disk becomes a one-line
    `PrefError`. torch and safetensors report a full disk in their own words, so a disk left (nearly)
    without space is taken as the cause whatever the exception.
    """
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    remove(tmp)
    try:
        write(tmp)
    except Exception as exc:
        try:
            stats = os.statvfs(os.path.dirname(tmp) or ".")
            full = stats.f_bavail * stats.f_frsize < 1 << 20
        except OSError:
            full = False
        remove(tmp)  # a half-written copy must not go on filling the disk
        if isinstance(exc, OSError) and exc.errno:
            raise disk_error(f"cannot write {path}", exc) from None
        if full or "os error 28" in str(exc):
            raise disk_error(f"cannot write {path}", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def disk_error(action: str, exc: OSError) -> PrefError:
    """A one-line error for a failed write: `action` ("cannot write to runs/x") and the errno's name and text."""
    code = errno.errorcode.get(exc.errno or 0, "")
    hint = "free some space or choose another --output-dir" if code in ("ENOSPC", "EDQUOT") else "choose a writable --output-dir"
    return PrefError(f"{action}: {exc.strerror or exc} ({code or type(exc).__name__}); {hint}")


def remove(path: str) -> None:
    """Remove the file or folder `path` if it is there: only ever pref's own temporary copies."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of a full run's, a LoRA run's adapters): all a checkpoint needs of the model.

    A sharded model's are gathered whole: every process calls this, process 0 gets them, the others {}.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if is_sharded(model):
        gathered = whole_state_dict(model)
        return {name: gathered[name] for name in names if name in gathered}
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trained_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put `trained_weights` back (cut to this process's pieces where sharded); they must be exactly the parameters that train here."""
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(expected):
        raise PrefError(f"the checkpoint holds other trained weights than this run trains ({len(weights)} vs {len(expected)} tensors); "
                        "resume with the settings it was saved with (--lora and its options)")
    model.load_state_dict({name: sharded_like(tensor, expected[name]) for name, tensor in weights.items()}, strict=False)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints in `run_dir`, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := PATTERN.match(name))]
    return [os.path.join(run_dir, name) for _, name in sorted(found)]


@dataclass
class Trained:
    """The live objects a checkpoint saves from and restores into."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    second_model: torch.nn.Module | None = None
    second_optimizer: torch.optim.Optimizer | None = None
    reference: torch.nn.Module | None = None  # only where the objective moves the reference (`needs.moves_reference`)
    reference_state: dict[str, torch.Tensor] = field(default_factory=dict)  # and its `Objective.reference_state`


def save_checkpoint(run_dir: str, step: int, trained: Trained, state: dict[str, Any], rng_states: list[dict[str, Any]],
                    objective_states: list[dict[str, Any]] | None = None, keep: int = 2, write: bool = True) -> str:
    """Write checkpoint `step` atomically and delete all but the newest `keep`.

    `state` is JSON (seed, world, data position); `rng_states` and `objective_states`
    hold every process's random state and objective state, index = process rank.
    Every process calls it (a sharded model is gathered whole first); only the one with `write` writes.
    """
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    weights, optimizer_state = trained_weights(trained.model), whole_optimizer_state(trained.optimizer, keep=write)
    # a moved reference: every parameter (tied ones once), what TR-DPO's updates change, and its state; gathered whole where sharded
    reference = None if trained.reference is None else {
        **{name: whole(p, keep=write) for name, p in trained.reference.named_parameters()},
        **{REFERENCE_STATE + name: whole(t, keep=write) for name, t in trained.reference_state.items()}}
    if not write:
        return final
    files = {
        OPTIMIZER_FILE: optimizer_state,
        SCHEDULER_FILE: trained.scheduler.state_dict(),
        **{RNG_FILE.format(rank=rank): rng for rank, rng in enumerate(rng_states)},
        EXTRA_FILE: {
            MODULES: {name: module.state_dict() for name, module in trained.modules.items()},
            SECOND_MODEL: trained.second_model.state_dict() if trained.second_model is not None else None,
            SECOND_OPTIMIZER: trained.second_optimizer.state_dict() if trained.second_optimizer is not None else None,
            OBJECTIVE: list(objective_states or []),
        },
    }

    def write_files(tmp: str) -> None:
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, MODEL_FILE))
        if reference is not None:
            save_file({name: tensor.contiguous() for name, tensor in reference.items()}, os.path.join(tmp, REFERENCE_FILE))
        for name, contents in files.items():
            torch.save(contents, os.path.join(tmp, name))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "step": step}, f, indent=2)
        _fsync_dir(tmp)

    write_atomically(final, write_files)
    _fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint_dir: str) -> dict[str, Any]:
    """The JSON state of a checkpoint (step, seed, world, data position), to check before loading it."""
    return _load_safely(checkpoint_dir, STATE_FILE)


def mark_evaluated(run_dir: str, step: int, write: bool = True) -> None:
    """Note in checkpoint `step`'s state, when the run has one, that its step has been evaluated since it was written.

    A run that stops early evaluates its last step then; a resume from that checkpoint stops at once too and must not
    evaluate (and log) the step a second time. Only the process with `write` writes.
    """
    path = os.path.join(run_dir, f"checkpoint-{step:06d}", STATE_FILE)
    if write and os.path.isfile(path):
        state = {**read_state(os.path.dirname(path)), "evaluated": True}

        def write_state(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)

        write_atomically(path, write_state)


def load_checkpoint(checkpoint_dir: str, trained: Trained, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore what `save_checkpoint` wrote into `trained`, and this process's RNG.

    Returns the JSON state and this process's objective state. Nothing is unpickled
    beyond tensors and plain data (`weights_only=True`), so a checkpoint someone shared
    cannot run code; a file that does not load that way is a one-line `PrefError` naming it.
    """
    load_trained_weights(trained.model, _load_safely(checkpoint_dir, MODEL_FILE))
    if trained.reference is not None:
        load_reference_weights(trained.reference, checkpoint_dir, trained.reference_state)
    # Adam's moments and the schedule's step come back; the peak learning rate, weight decay and schedule stay this run's
    # own, as a resume may change them (run.json records it), instead of the checkpoint's silently winning
    settings = [(group["initial_lr"], group["weight_decay"]) for group in trained.optimizer.param_groups]
    load_optimizer_state(trained.optimizer, _load_safely(checkpoint_dir, OPTIMIZER_FILE))
    scheduler = trained.scheduler
    scheduler.load_state_dict({**_load_safely(checkpoint_dir, SCHEDULER_FILE), "base_lrs": scheduler.base_lrs})
    for group, (peak, decay), factor in zip(trained.optimizer.param_groups, settings, scheduler.lr_lambdas):
        group.update(initial_lr=peak, weight_decay=decay, lr=peak * factor(scheduler.last_epoch))
    set_rng_state(_load_safely(checkpoint_dir, RNG_FILE.format(rank=rank)))
    extra = _load_safely(checkpoint_dir, EXTRA_FILE)
    for name, module in trained.modules.items():
        module.load_state_dict(extra[MODULES][name])
    if trained.second_model is not None:
        trained.second_model.load_state_dict(extra[SECOND_MODEL])
    if trained.second_optimizer is not None:
        trained.second_optimizer.load_state_dict(extra[SECOND_OPTIMIZER])
    objective_states = extra[OBJECTIVE]
    return read_state(checkpoint_dir), objective_states[rank] if rank < len(objective_states) else {}


def load_reference_weights(model: torch.nn.Module, checkpoint_dir: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Put the moved reference's weights and `state` back; a checkpoint saved without them cannot resume this run exactly."""
    path, state = os.path.join(checkpoint_dir, REFERENCE_FILE), state or {}
    if not os.path.exists(path):
        raise PrefError(f"{checkpoint_dir} holds no reference weights ({REFERENCE_FILE}), but this run moves its reference "
                        f"({MOVING_OPTIONS}); resume with the options it was saved with, or start afresh")
    weights, params = _load_safely(checkpoint_dir, REFERENCE_FILE), dict(model.named_parameters())
    if set(weights) != set(params) | {REFERENCE_STATE + name for name in state}:
        raise PrefError(f"{path} holds another model's weights, or another way of moving them, than this run's reference; "
                        "resume with the model and options it was saved with")
    model.load_state_dict({name: sharded_like(weights[name], param) for name, param in params.items()}, strict=False)
    for name, tensor in state.items():
        tensor.copy_(sharded_like(weights[REFERENCE_STATE + name], tensor))


def _load_safely(checkpoint_dir: str, name: str) -> Any:
    path = os.path.join(checkpoint_dir, name)
    try:
        if name.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return load_file(path) if name.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects; OSError, ValueError, RuntimeError or safetensors' own for broken files
        if isinstance(exc, pickle.UnpicklingError):
            reason = "it holds Python objects other than tensors and plain data"
        else:
            reason = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or ["no details"])[0][:200]
        raise PrefError(f"cannot load checkpoint file {path} safely ({reason}); "
                        "it is damaged, tampered with or from another program: resume from another checkpoint or start afresh") from None


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
