"""The output folder of a run: pref writes only into folders that are new, empty or its own, one run at a time.

`claim_output_dir(out_dir, resuming)` is called before the model loads. It
refuses, each with a one-line `PrefError`: a path that is a file, a non-empty
folder that holds no pref run (pref never deletes or appends to a user's
files), a folder it cannot write to (read-only, full, no permission), and a
folder another run is using. It returns the `RunLock` held for the run.

The lock is the file `.pref-run.lock` holding {"pid", "host", "started"} of
the run that holds it, locked with `flock`: the system drops the lock when its
process dies, so the file a killed run leaves behind is recognised as stale
and taken over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

from pref.agreement import same_decision
from pref.checkpoint import STATE_FILE, disk_error, list_checkpoints, remove
from pref.errors import PrefError
from pref.reporting.runs import final_config

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
FINAL_DIR = "final"
LOCK_FILE = ".pref-run.lock"
#: Settings a checkpoint is bound to (its weights' shapes, its loss, its data and its position in them): a resume cannot change them.
FIXED_ON_RESUME = ("objective", "objective_options", "model", "quantize", "adapter", "adapter_options", "dataset", "dataset_options",
                   "validation_split", "validation_dataset", "reward", "reward_options", "reward_weights", "selector", "selector_options",
                   "embedder", "embedder_options", "reference", "reference_model", "seed", "batch_size", "grad_accum", "samples_per_prompt", "max_length",
                   "max_prompt_length", "bucket_window", "sampler", "sampler_options", "curriculum", "curriculum_options", "chat_template")
_held: dict[str, "RunLock"] = {}  # locks this process holds, by path


def claim_output_dir(out_dir: str, resuming: bool, accelerator: Any = None) -> "RunLock | None":
    """Check `out_dir` can take this run, create it, lock it: the held `RunLock` (on the main process; None elsewhere).

    With an `accelerator`, the main process checks and every process raises its error together.
    """
    if accelerator is None:
        return _claim(out_dir, resuming)
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = _claim(out_dir, resuming)
        except PrefError as exc:
            error = str(exc)
    same_decision(accelerator, error)
    return lock


def _claim(out_dir: str, resuming: bool) -> "RunLock":
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrefError(f"--output-dir {out_dir} is a file, not a folder; choose a folder path")
    if os.path.isdir(out_dir):
        # run.json marks a pref run; a run killed before writing it leaves only its lock
        foreign = sorted(name for name in os.listdir(out_dir) if name != LOCK_FILE)
        if foreign and RUN_FILE not in foreign:
            raise PrefError(f"--output-dir {out_dir} is not empty and holds no pref run (it has {', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); pref writes only into new or empty folders: choose another")
    if not resuming and os.path.exists(os.path.join(out_dir, RUN_FILE)):
        if list_checkpoints(out_dir) or os.path.exists(os.path.join(out_dir, FINAL_DIR)):
            raise PrefError(f"{out_dir} already holds a run; pass --resume {out_dir} to continue it or choose another --output-dir")
        log.info(f"{out_dir} holds a run stopped before its first checkpoint: starting it again")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise disk_error(f"cannot create --output-dir {out_dir}", exc) from None
    lock = RunLock(out_dir)
    lock.acquire()
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):  # our own half-written copies from a run that was killed
            remove(os.path.join(out_dir, name))
    return lock


def release_locks() -> None:
    """Release every run lock this process holds (after a run, finished or failed)."""
    for lock in list(_held.values()):
        lock.release()


class RunLock:
    """The lock of one run folder, held by this process from `acquire()` to `release()`."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        earlier = _held.pop(self.path, None)
        if earlier is not None:  # an earlier run in this process ended without releasing (an exception)
            earlier.release()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise disk_error(f"cannot write to --output-dir {os.path.dirname(self.path)}", exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder()
                for _ in range(20):  # a run that has just taken the lock writes its record a moment later
                    if holder != "unknown holder":
                        break
                    time.sleep(0.05)
                    holder = self.holder()
                raise PrefError(f"--output-dir {os.path.dirname(self.path)} is in use by another pref run ({holder}); "
                                "wait for it to finish or choose another --output-dir") from None
            # the file may have been removed by its holder between our open and our lock: start again
            with suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        stale = self.holder()
        if stale != "unknown holder":
            log.info(f"taking over the stale lock of a run that is no longer running ({stale})")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise disk_error(f"cannot write to --output-dir {os.path.dirname(self.path)}", exc) from None
        self.fd = fd
        _held[self.path] = self

    def holder(self) -> str:
        """Who the lock file names: "pid N on HOST since TIME"."""
        try:
            with open(self.path) as f:
                record = json.load(f)
            return f"pid {record['pid']} on {record['host']} since {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown holder"

    def release(self) -> None:
        """Remove the lock file and unlock; a no-op when not held."""
        if self.fd is None:
            return
        with suppress(OSError):
            os.remove(self.path)  # while still locked, so no one else's lock file is removed
        os.close(self.fd)
        self.fd = None
        if _held.get(self.path) is self:
            del _held[self.path]


def resume_checkpoint(path: str) -> str | None:
    """The checkpoint to resume from: `path` itself, or the newest in the run folder `path`.

    None for a run stopped before its first checkpoint: it starts again from step 0.
    """
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if os.path.exists(os.path.join(path, RUN_FILE)):
        log.info(f"{path} has no checkpoint yet (stopped before the first): starting it again from step 0")
        return None
    raise PrefError(f"no checkpoint in {path}; pass a run folder that has checkpoint-* folders (save them with --save-every N)")


def absolute_paths(config: Any, builders: Iterable[str] = ()) -> Any:
    """`config` with its local `--dataset`, `--validation-dataset` and `--model` paths, and reward functions' files, made absolute (a copy).

    run.json records them so, and a resume from another working directory reads the same files.
    Names in `builders` (registered dataset builders) stay names even if a folder is called so.
    """
    return dataclasses.replace(config, **absolute_entries(dataclasses.asdict(config), builders))


def absolute_entries(settings: dict[str, Any], builders: Iterable[str] = ()) -> dict[str, Any]:
    """The `dataset`, `validation_dataset`, `model`, `reference_model`, `chat_template`, `dataset_options` and `reward` of `settings` (a config as a dict) that it holds,
    local paths made absolute; names in `builders` stay names."""
    builders = set(builders)

    def absolute(entry: Any) -> Any:
        is_local = isinstance(entry, str) and entry not in builders and os.path.exists(os.path.expanduser(entry))
        return os.path.abspath(os.path.expanduser(entry)) if is_local else entry

    options = settings.get("dataset_options") or {}
    if isinstance(options.get("path"), str):
        options = {**options, "path": absolute(options["path"])}
    def absolute_file(reward: Any) -> Any:  # a reward function's file: `--reward rewards.py:accuracy`
        file, _, name = reward.rpartition(":") if isinstance(reward, str) else ("", "", "")
        return f"{absolute(file)}:{name}" if file.endswith(".py") else reward

    reward = settings.get("reward")
    entries = {"dataset": [absolute(e) for e in settings.get("dataset") or []], "model": absolute(settings.get("model")),
               "reference_model": absolute(settings.get("reference_model")), "chat_template": absolute(settings.get("chat_template")),
               "validation_dataset": [absolute(e) for e in settings.get("validation_dataset") or []], "dataset_options": options,
               "reward": [absolute_file(r) for r in reward] if isinstance(reward, (list, tuple)) else absolute_file(reward)}
    return {key: value for key, value in entries.items() if key in settings}


def moved_data(file_config: dict[str, Any]) -> str | None:
    """For a resume: a message naming the first absolute data or model path of a run's record that is gone."""
    entries = [*(file_config.get("dataset") or []), *(file_config.get("validation_dataset") or []), file_config.get("model"),
               file_config.get("reference_model"), (file_config.get("dataset_options") or {}).get("path"), file_config.get("chat_template")]
    for entry in entries:
        if isinstance(entry, str) and os.path.isabs(entry) and not os.path.exists(entry):
            return (f"this run read {entry}, which is no longer there (moved or deleted); put it back, or pass its new "
                    "place with --dataset (or --model, --reference-model, --chat-template) along with --resume")
    return None


def recorded_settings(out_dir: str, step: float = math.inf) -> dict[str, Any] | None:
    """The settings run.json in `out_dir` records for a checkpoint of step `step`: those the run started with and its
    earlier resumes' changes. None where there is no readable record (a checkpoint copied alone)."""
    try:
        with open(os.path.join(out_dir, RUN_FILE), encoding="utf-8") as f:
            return final_config(json.load(f), step)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resumed_record(record: dict[str, Any], out_dir: str, step: int, builders: Iterable[str] = (),
                   default_reward: str | None = None) -> dict[str, Any]:
    """The run.json of a run resumed from step `step`'s checkpoint; `record` is the one today's settings alone would give.

    It keeps the settings the run started with and adds {"step": step, "changed": {setting: [old, new]}} to its
    `resumes` when a setting changed (resumes from this step on are dropped: their steps are trained again).
    A changed FIXED_ON_RESUME setting is a PrefError, except a model or data path that is gone, given anew.
    `default_reward`: the reward the run uses when it names none (its objective's), which an earlier pref recorded as none.
    """
    now = json.loads(json.dumps(record["config"], default=str))  # as run.json holds it
    if now["steps"] < step:
        raise PrefError(f"cannot resume {out_dir} with steps {now['steps']}: its checkpoint is at step {step}; give --steps {step} or more")
    try:
        with open(os.path.join(out_dir, RUN_FILE), encoding="utf-8") as f:
            earlier = json.load(f)
        before, resumes = final_config(earlier, step), [r for r in earlier.get("resumes", []) if r["step"] < step]
        before.update(absolute_entries(before, builders))  # a run.json from before paths were recorded absolute holds them as given
        if before.get("reward") is None and default_reward:  # today's pref records the default it resolved
            before["reward"] = default_reward
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no record of its own (a checkpoint copied alone): today's settings
        return record
    changed = {key: [before[key], value] for key, value in now.items()
               if key in before and before[key] != value and key not in ("output_dir", "resume")}  # where it is, not how it trains
    for key, (was, value) in changed.items():
        if key in FIXED_ON_RESUME and not (key in ("model", "reference_model", "dataset", "dataset_options", "validation_dataset", "chat_template") and moved_data({key: was})):
            was, value = ("none" if v is None else json.dumps(v) for v in (was, value))
            raise PrefError(f"cannot resume {out_dir} with {key} {value}: it was trained with {key} {was}, which a resume cannot change; "
                            "resume without changing it, or start a new run with --output-dir NEW")
    resumes += [{"step": step, "changed": changed}] if changed else []
    return {**record, "config": {**earlier["config"], "output_dir": now["output_dir"]}, "resumes": resumes}
