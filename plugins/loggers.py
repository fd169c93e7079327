"""Metrics loggers: JSON lines (always available) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import os

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import MetricsLogger

METRICS_FILE = "metrics.jsonl"


class JsonlLogger(MetricsLogger):
    """One JSON object per logged step, appended to `metrics.jsonl` in the run folder."""

    def __init__(self, output_dir: str):
        self.file = open(os.path.join(output_dir, METRICS_FILE), "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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


@hookimpl
def register_loggers(register):
    register("jsonl", JsonlLogger)
    register("tensorboard", TensorBoardLogger)
