"""Metrics loggers: the built-in JSONL one, TensorBoard, and a throw-away plugin logger in a run."""

import importlib.util
import json

import pytest

from pref.config import build_config
from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import MetricsLogger
from pref.plugins.loggers import JsonlLogger, TensorBoardLogger
from pref.registry import Registry, get_plugin_manager
from pref.train import train


def test_jsonl_logger_appends_one_line_per_step(tmp_path):
    logger = JsonlLogger(str(tmp_path))
    logger.log(1, {"loss": 0.5})
    logger.log(2, {"loss": 0.25})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_tensorboard_logger_needs_tensorboard(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(PrefError, match="pip install tensorboard"):
            TensorBoardLogger(str(tmp_path))
    else:
        logger = TensorBoardLogger(str(tmp_path))
        logger.log(1, {"loss": 0.5})
        logger.close()
        assert any((tmp_path / "tensorboard").iterdir())


class Recorder(MetricsLogger):
    """Keeps what it is given, for the test to look at."""

    seen: list = []

    def __init__(self, output_dir):
        self.output_dir = output_dir

    def log(self, step, metrics):
        Recorder.seen.append((step, dict(metrics)))

    def close(self):
        Recorder.seen.append(("closed", {}))


class RecorderPlugin:
    @hookimpl
    def register_loggers(register):
        register("recorder", Recorder)


def test_a_plugin_logger_gets_every_step(tmp_path, tiny_model_dir, prefs_file):
    pm, failures, sources = get_plugin_manager()
    pm.register(RecorderPlugin, name="recorder-plugin")
    Recorder.seen = []
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 3, "batch_size": 2,
                                 "device": "cpu", "output_dir": str(tmp_path / "run"), "loggers": ["recorder", "jsonl"]})
    train(config, Registry(pm, failures, sources))
    assert [step for step, _ in Recorder.seen] == [1, 2, 3, "closed"]
    assert "loss" in Recorder.seen[0][1] and "rewards/accuracies" in Recorder.seen[0][1]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_an_unknown_logger_fails_before_training(tmp_path, prefs_file):
    config = build_config(flags={"objective": "dpo", "dataset": [prefs_file], "output_dir": str(tmp_path / "run"), "loggers": ["no-such-logger"]})
    with pytest.raises(PrefError, match="unknown logger 'no-such-logger'"):
        train(config, Registry(*get_plugin_manager()))
