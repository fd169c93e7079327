"""The `function` reward: a Python function in a file of your own scores the completions, as TRL's reward functions do.

`--reward rewards.py:accuracy` is this reward with `path=rewards.py:accuracy` (so is `--reward function
--reward-option path=rewards.py:accuracy`); no package to write. The file is imported once. The function is
called with keyword arguments: `completions` (one per completion: its text, or, where its prompt is chat messages,
`[{"role": "assistant", "content": text}]`, as TRL gives them), `prompts` (the prompt of each: its text or its
chat messages) and `completion_ids` (each completion's token ids, as sampled) if it names them, and each of its
other parameters without a default as a
column of the prompts' rows, one value per completion: `def accuracy(completions, answer, **kwargs)` gets the
`answer` of each completion's row (read by the `prompts` builder; a row without it is refused before training).
As TRL's trainers, pref also passes a function that names them or takes `**kwargs`:

- `trainer_state`: `TrainerState`'s `global_step` (the optimizer steps done when the samples were drawn) and `max_steps`
  (the run's `--steps`), for shaping by training progress; None outside training (`pref eval`);
- `log_metric(name, value)`: a figure, logged with the step as `reward/NAME` (the mean of the step's values);
- `log_extra(column, values)`: one value per completion of the call, written with each sample by `--log-completions`.

It returns one number per completion (a list or a tensor), the `reward` score; None (or NaN) leaves a completion
unscored, as TRL's reward functions do for samples they do not apply to (see `RewardSource.score`). An `async def`
function is awaited.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import math
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource

#: Parameters the function may take besides the columns.
GIVEN = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
#: Given to a function that takes **kwargs too, as TRL gives them (`completion_ids` only when named: a gold reward gets none).
GIVEN_TO_KWARGS = ("prompts", "trainer_state", "log_metric", "log_extra")
#: What TRL's trainers also pass, and pref does not: a function that needs one is refused, not sent looking for a column.
TRL_ONLY = ("environments",)


@dataclass(frozen=True)
class TrainerState:
    """The part of transformers' `TrainerState` that reward functions read (importing that one costs seconds)."""

    global_step: int
    max_steps: int


class FunctionReward(RewardSource):
    """A Python function in a file scores each completion (`--reward FILE.py:FUNCTION`), given the columns of its prompt's row it names."""

    def __init__(self, path: str):
        file, colon, name = path.rpartition(":")
        if not colon or not file.endswith(".py") or not name.isidentifier():
            raise PrefError(f"function: path must be FILE.py:FUNCTION, e.g. rewards.py:accuracy, not {path!r}")
        file = os.path.expanduser(file)
        if not os.path.isfile(file):
            raise PrefError(f"function: no such file {file} (from --reward {path})")
        function = getattr(load_file(file), name, None)
        if not callable(function):
            raise PrefError(f"function: {file} defines no function {name!r}")
        parameters = inspect.signature(function).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if "completions" not in parameters and not takes_any:
            raise PrefError(f"function: {name} in {file} must take a `completions` parameter (a list: one text per completion)")
        self.function, self.label, self.file = function, f"{name} in {file}", os.path.abspath(file)
        self.given = {n for n in GIVEN_TO_KWARGS if n in parameters or takes_any}
        self.reads_completion_ids = "completion_ids" in parameters  # named: **kwargs alone does not get them
        self.state: TrainerState | None = None  # told by the loop (at_step); None outside training
        self.figures: dict[str, list[float]] = {}  # log_metric's, since the host last asked
        self.extra: dict[str, list[Any]] = {}  # log_extra's, of the last call
        self.columns = tuple(n for n, p in parameters.items()
                             if n not in GIVEN and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty)
        unsupported = [n for n in self.columns if n in TRL_ONLY]
        if unsupported:
            raise PrefError(f"function: {name} in {file} needs `{unsupported[0]}`, which TRL's trainers pass and pref does not (it gives "
                            "prompts, completions, completion_ids, trainer_state, log_metric, log_extra and the rows' columns); "
                            "give that parameter a default, or take **kwargs")

    def at_step(self, step: int, steps: int) -> None:
        self.state = TrainerState(global_step=step, max_steps=steps)

    def log_metric(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(float(value))  # a number, or a tensor of one

    def log_extra(self, column: str, values: list[Any]) -> None:
        self.extra.setdefault(column, []).extend(values)

    def logged(self) -> tuple[dict[str, float], dict[str, list[Any]]]:
        figures = {name: sum(values) / len(values) for name, values in self.figures.items()}
        extra, self.figures, self.extra = self.extra, {}, {}
        return figures, extra

    def score(self, prompts: list[Prompt], completions: list[str], **columns: list[Any]) -> dict[str, torch.Tensor]:
        given = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(prompts, completions)]  # as TRL's
        passed = {"prompts": list(prompts), "trainer_state": self.state, "log_metric": self.log_metric, "log_extra": self.log_extra}
        self.extra = {}  # one value per completion of this call
        try:
            values = self.function(completions=given, **{n: v for n, v in passed.items() if n in self.given}, **columns)
            if inspect.isawaitable(values):  # an `async def` function
                values = asyncio.run(values)
        except Exception as exc:  # the user's own code: where it failed, in one line
            lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if os.path.abspath(frame.filename) == self.file]
            where = f" at line {lines[-1]} of {self.file}" if lines else ""
            gets = ("outside training (pref eval) its trainer_state is None: let it score without one"
                    if self.state is None and "trainer_state" in self.given and "NoneType" in str(exc) else
                    "it gets each completion as a text, or as [{'role': 'assistant', 'content': text}] where its prompt is chat messages")
            raise PrefError(f"the reward function {self.label} raised {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}{where}; "
                            f"{gets}") from None
        if isinstance(values, (list, tuple)):
            values = [math.nan if value is None else value for value in values]  # unscored
        try:
            rewards = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            rewards = None
        if rewards is None or rewards.shape != (len(completions),):
            what = f"a tensor of shape {list(rewards.shape)}" if rewards is not None else f"{type(values).__name__} {str(values)[:60]}"
            raise PrefError(f"the reward function {self.label} gave {what}; it must return one number per completion ({len(completions)})")
        return {"reward": rewards}


def load_file(file: str) -> Any:
    """The module that the Python file `file` defines, imported once per process; its errors are a one-line `PrefError`."""
    path = os.path.abspath(file)
    name = f"pref_reward_file_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise PrefError(f"function: importing {file} failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
        sys.modules[name] = module
    return sys.modules[name]


@hookimpl
def register_rewards(register):
    register("function", FunctionReward)
