"""Metrics loggers: the built-in JSONL one, TensorBoard, and a throw-away plugin logger in a run."""

import importlib.util
import json

import pytest

from pref.config import build_config
from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import MetricsLogger
from pref.plugins.loggers import JsonlLogger, TensorBoardLogger
from pref.plan import resolve_plan
from pref.registry import Registry, get_plugin_manager, load_registry
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


class Watcher(MetricsLogger):
    """Keeps when the loop starts, shows and stops it, as a progress display sees the run."""

    calls: list = []

    def start(self, total_steps, start_step):
        Watcher.calls.append(("start", total_steps, start_step))

    def log(self, step, metrics):
        pass

    def show(self, step, metrics):
        Watcher.calls.append(("show", step))

    def stop(self):
        Watcher.calls.append(("stop",))


class RecorderPlugin:
    @hookimpl
    def register_loggers(register):
        register("recorder", Recorder)
        register("watcher", Watcher)


def test_a_plugin_logger_gets_every_step(tmp_path, tiny_model_dir, prefs_file, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # room for every figure the bar shows
    pm, failures, sources = get_plugin_manager()
    pm.register(RecorderPlugin, name="recorder-plugin")
    Recorder.seen = []
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 3, "batch_size": 2,
                                 "device": "cpu", "output_dir": str(tmp_path / "run"), "loggers": ["recorder", "jsonl"]})
    train(config, Registry(pm, failures, sources))
    assert [step for step, _ in Recorder.seen] == [1, 2, 3, "closed"]
    assert "loss" in Recorder.seen[0][1] and "rewards/accuracies" in Recorder.seen[0][1]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    bar = capsys.readouterr().err  # the progress bar, on by default, ends on stderr at its last step
    assert "3/3" in bar and "loss" in bar and "tok/s" in bar


def test_progress_is_a_plain_line_per_logged_step_in_a_log_file_and_a_bar_in_a_terminal(tmp_path, tiny_model_dir, prefs_file, capsys,
                                                                                          monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # narrower than a line: a log file's lines are never cut short
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    flags = {"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 3, "batch_size": 2, "device": "cpu",
             "log_every": 2}
    train(build_config(flags={**flags, "output_dir": str(tmp_path / "file")}), load_registry())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train")]
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"]  # the logged steps, as they end
    for line in lines:
        assert " eta " in line and "loss " in line and "accuracies " in line and "margins " in line and line.endswith("tok/s"), line
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # stderr as a terminal: one bar, drawn in place at every step
    train(build_config(flags={**flags, "output_dir": str(tmp_path / "terminal")}), load_registry())
    err = capsys.readouterr().err
    assert "━" in err and "3/3" in err and not [line for line in err.splitlines() if line.startswith("train 2/3")]


def test_a_precompute_says_what_it_computes_in_one_plain_line_in_a_log_file(capsys, monkeypatch):
    from pref.reference import precompute_progress

    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    with precompute_progress(12) as advance:
        advance(12)
    assert capsys.readouterr().err == "reference log-probs (once, then cached): 12 rows\n"  # no bar, no blank line after it
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: the bar, gone when done
    with precompute_progress(12, "samples of each prompt") as advance:
        advance(12)
    assert "samples of each prompt: 12 rows" not in capsys.readouterr().err


def test_a_logger_is_shown_every_step_and_stopped_when_a_step_fails(tmp_path, tiny_model_dir, prefs_file, interrupted_after):
    pm, failures, sources = get_plugin_manager()
    pm.register(RecorderPlugin, name="recorder-plugin")
    Recorder.seen, Watcher.calls = [], []
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 4, "batch_size": 2,
                                 "device": "cpu", "output_dir": str(tmp_path / "run"), "loggers": ["recorder", "watcher"], "log_every": 2})
    with interrupted_after(3):
        train(config, Registry(pm, failures, sources))
    assert Watcher.calls == [("start", 4, 0), ("show", 1), ("show", 2), ("show", 3), ("stop",)]
    assert [step for step, _ in Recorder.seen] == [2]  # logged every 2 steps; not closed: the run failed


def test_log_every_from_the_command_line(tmp_path, tiny_model_dir, prefs_file):
    from click.testing import CliRunner

    from pref.cli.main import cli

    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--steps", "3",
                                      "--batch-size", "2", "--device", "cpu", "--log-every", "2", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [2, 3]


def test_the_last_step_is_logged_whatever_log_every_says(tmp_path, tiny_model_dir, prefs_file):
    pm, failures, sources = get_plugin_manager()
    pm.register(RecorderPlugin, name="recorder-plugin")
    Recorder.seen = []
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 3, "batch_size": 2,
                                 "device": "cpu", "output_dir": str(tmp_path / "run"), "loggers": ["recorder"], "log_every": 2})
    train(config, Registry(pm, failures, sources))
    assert [step for step, _ in Recorder.seen] == [2, 3, "closed"]  # the final model's figures are in the log


def test_the_progress_bar_is_a_logger_on_unless_switched_off(prefs_file):
    registry = load_registry()
    flags = {"objective": "dpo", "dataset": [prefs_file]}
    assert resolve_plan(build_config(flags=flags), registry).loggers == ("jsonl", "progress")
    assert resolve_plan(build_config(flags={**flags, "loggers": ["wandb"]}), registry).loggers == ("wandb", "progress")
    assert resolve_plan(build_config(flags={**flags, "progress": False}), registry).loggers == ("jsonl",)
    assert resolve_plan(build_config(flags={**flags, "loggers": ["progress", "jsonl"]}), registry).loggers == ("progress", "jsonl")


def test_an_unknown_logger_fails_before_training(tmp_path, prefs_file):
    config = build_config(flags={"objective": "dpo", "dataset": [prefs_file], "output_dir": str(tmp_path / "run"), "loggers": ["no-such-logger"]})
    with pytest.raises(PrefError, match="unknown logger 'no-such-logger'"):
        train(config, Registry(*get_plugin_manager()))


def test_trimming_a_step_log_on_a_full_disk_is_a_one_line_error_and_keeps_the_log(tmp_path, monkeypatch):
    import builtins
    import errno

    from pref.plugins import loggers

    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(original)

    def full_disk_open(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(loggers, "open", full_disk_open, raising=False)
    with pytest.raises(PrefError, match="No space left on device .ENOSPC.; free some space"):
        loggers.keep_steps_up_to(str(path), 1)
    assert path.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no half-written copy left
    monkeypatch.undo()
    loggers.keep_steps_up_to(str(path), 1)
    assert path.read_text() == json.dumps({"step": 1}) + "\n"
