"""Metrics loggers: JSON lines (always available), TensorBoard (when installed) and the progress bar on stderr."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from pref.checkpoint import write_atomically
from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import MetricsLogger
from pref.plan import PROGRESS

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"  # --log-completions
#: The metrics the bar shows when present, in this order, and their labels there (the samples' `reward/mean` is "reward": a bare "mean" said nothing).
SHOWN = {"loss": "loss", "rewards/accuracies": "accuracies", "rewards/margins": "margins", "reward/mean": "reward",
         "samples/distinct_ratio": "distinct_ratio", "pairs/usable_fraction": "usable_fraction"}
#: Tokens the step processed per second, when the loop measures it; shown after the metrics.
TOKENS_PER_SECOND = "tokens/per_second"


def keep_steps_up_to(path: str, step: int) -> None:
    """Drop the lines of the step log `path` (JSON lines with a "step") after `step`: a resumed run logs those steps again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):  # a full disk is a one-line error; the log stays whole until the rename

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)

        write_atomically(path, write)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a half-written last line of a killed run goes too


class JsonlLogger(MetricsLogger):
    """One JSON object per logged step, appended to `metrics.jsonl` in the run folder; with `--log-completions`, one per
    sample of the step's rollout in `completions.jsonl` (its step, prompt, completion and scores)."""

    def __init__(self, output_dir: str):
        self.path, self.completions_path = os.path.join(output_dir, METRICS_FILE), os.path.join(output_dir, COMPLETIONS_FILE)
        self.file = open(self.path, "a")
        self.completions: Any = None  # opened at the first completions

    def start(self, total_steps: int, start_step: int) -> None:
        self.file.close()
        for path in (self.path, self.completions_path):
            keep_steps_up_to(path, start_step)
        self.file = open(self.path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.completions = self.completions or open(self.completions_path, "a", encoding="utf-8")
        self.completions.writelines(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in rows)
        self.completions.flush()

    def close(self) -> None:
        self.file.close()
        if self.completions:
            self.completions.close()


class TensorBoardLogger(MetricsLogger):
    """TensorBoard event files in `tensorboard/` in the run folder (needs the tensorboard package)."""

    def __init__(self, output_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PrefError("the tensorboard logger needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class ProgressBar(MetricsLogger):
    """A rich progress bar on stderr: steps, elapsed time, ETA, the latest loss and a few metrics, tokens/s when measured.

    In a terminal (or a notebook) it shows every step (`show`), logged or not. Where stderr is a file
    (a cluster job's log), a bar drawn in place would reach it only at the end: each logged step
    (`log`, every --log-every) gets a plain line there instead, with the same figures, never cut
    short. It writes no file of its own.
    """

    BAR_WIDTH = 20

    def __init__(self) -> None:
        console = Console(stderr=True)
        self.live = console.is_terminal or console.is_jupyter
        # the metrics are cut short (…) to the width left: too long, they squeezed the step count and times to "1…"
        self.metrics = TextColumn("{task.fields[metrics]}", table_column=Column(no_wrap=True, overflow="ellipsis"))
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=self.BAR_WIDTH),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            self.metrics,
            console=console,
        )
        self.task = self.progress.add_task("train", total=None, metrics="")
        self.total, self.start_step, self.began = 0, 0, time.monotonic()

    def start(self, total_steps: int, start_step: int) -> None:
        self.progress.update(self.task, total=total_steps, completed=start_step)
        self.total, self.start_step, self.began = total_steps, start_step, time.monotonic()
        if self.live:
            self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Not in a terminal: the step's plain line (`train 40/400  0:00:05 eta 0:00:45  loss 0.69 ...`)."""
        if self.live:
            return
        elapsed, done = time.monotonic() - self.began, step - self.start_step
        left = clock(elapsed / done * (self.total - step)) if done > 0 else "-:--:--"
        line = f"train {step}/{self.total}  {clock(elapsed)} eta {left}  {figures(metrics)}"
        self.progress.console.print(line, soft_wrap=True, markup=False, highlight=False)

    def show(self, step: int, metrics: dict[str, float]) -> None:
        if not self.live:
            return
        # "train ", the bar, "N/TOTAL ", the elapsed time, "eta ", the time left (each with its space), at this terminal's width
        others = 6 + self.BAR_WIDTH + 1 + 2 * len(str(self.total)) + 2 + 8 + 4 + 8
        self.metrics.get_table_column().max_width = max(10, self.progress.console.width - others - 1)
        self.progress.update(self.task, completed=step, metrics=figures(metrics))

    def stop(self) -> None:
        if self.live:
            self.progress.stop()


def figures(metrics: dict[str, float]) -> str:
    """The figures the bar shows: `loss 0.693  accuracies 0.5 ...  1.1k tok/s`."""
    text = "  ".join(f"{label} {metrics[key]:.3g}" for key, label in SHOWN.items() if key in metrics)
    if TOKENS_PER_SECOND in metrics:
        text += f"  {tokens_per_second(metrics[TOKENS_PER_SECOND])}"
    return text


def clock(seconds: float) -> str:
    """`0:01:05`, as the bar shows times."""
    return str(timedelta(seconds=int(seconds)))


def tokens_per_second(value: float) -> str:
    """Throughput for the bar: `850 tok/s`, `12.3k tok/s`."""
    return f"{value / 1000:.1f}k tok/s" if value >= 1000 else f"{value:.0f} tok/s"


@hookimpl
def register_loggers(register):
    register("jsonl", JsonlLogger)
    register("tensorboard", TensorBoardLogger, requires=["tensorboard"])
    register(PROGRESS, ProgressBar, "progress bar on stderr: steps, ETA, loss, tokens/s; on unless --no-progress")
