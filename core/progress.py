"""A rich progress bar: steps, elapsed time, ETA, the latest loss and a few metrics, tokens/s when measured."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: Shown in the bar when present, in this order.
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "reward/mean", "samples/distinct_ratio", "pairs/usable_fraction")
#: Tokens the step processed per second, when the loop measures it; shown after the metrics.
TOKENS_PER_SECOND = "tokens/per_second"


class TrainingProgress:
    """Step counter and live metrics on stderr; silent when `enabled` is False."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
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
        if TOKENS_PER_SECOND in metrics:
            text += f"  {tokens_per_second(metrics[TOKENS_PER_SECOND])}"
        self.progress.update(self.task, completed=step, metrics=text)


def tokens_per_second(value: float) -> str:
    """Throughput for the bar: `850 tok/s`, `12.3k tok/s`."""
    return f"{value / 1000:.1f}k tok/s" if value >= 1000 else f"{value:.0f} tok/s"
