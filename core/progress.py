"""A rich progress bar with the latest loss and a few metrics."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: Shown in the bar when present, in this order.
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "reward/mean", "samples/distinct_ratio", "pairs/usable_fraction")


class TrainingProgress:
    """Step counter and live metrics on stderr; silent when `enabled` is False."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, metrics="")

    def __enter__(self) -> "TrainingProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        text = "  ".join(f"{key.split('/')[-1]} {metrics[key]:.3g}" for key in SHOWN if key in metrics)
        self.progress.update(self.task, completed=step, metrics=text)
