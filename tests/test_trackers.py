"""wandb (offline), MLflow (a local file store) and Trackio (local) loggers: what they recorded, read back."""

import glob
import importlib.util
import json
import os
import sqlite3
import sys
import time

import pytest

from pref.config import build_config
from pref.errors import PrefError
from pref.plugins.trackers import MlflowLogger, TrackioLogger, WandbLogger
from pref.registry import load_registry
from pref.train import train

CONFIG = {"objective": "dpo", "steps": 2, "objective_options": {"beta": 0.1}}
#: a step's --log-completions rows
ROWS = [{"prompt": "Name a fruit.", "completion": "apple", "reward": 1.0}, {"prompt": "Name a fruit.", "completion": "chair", "reward": 0.0}]


def wandb_records(path):
    """The protobuf records of an offline wandb run file (a LevelDB-style log: 32 KiB blocks of CRC-framed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def items(updates):
    """Key -> value of wandb's record items (a key is either `key` or a path `nested_key`)."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}


def read_wandb_run(folder):
    (path,) = glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.monotonic() + 60
    # wandb's service process may still be writing the file when finish() returns: wait for its exit record
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    history, config, summary = [], {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(items(record.history.item))
        elif kind == "run":
            config.update(items(record.run.config.update))
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "summary":
            summary.update(items(record.summary.update))
    return history, config, summary


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    logger = WandbLogger(str(tmp_path / "run-a"), config=CONFIG)
    logger.log(1, {"loss": 0.5, "rewards/margins": 0.1})
    logger.log(2, {"loss": 0.25, "rewards/margins": 0.3})
    logger.log_completions(2, ROWS)
    logger.finish(str(tmp_path / "run-a" / "final"))
    logger.close()
    history, config, summary = read_wandb_run(tmp_path / "run-a")  # WANDB_DIR unset: inside the run folder
    steps = [(row["_step"], row["loss"], row["rewards/margins"]) for row in history]
    assert steps == [(1, 0.5, 0.1), (2, 0.25, 0.3)]
    (table,) = [row for row in history if "completions._type" in row]  # wandb flattens the table's reference into keys
    assert table["_step"] == 2 and table["completions._type"] == "table-file" and table["completions.nrows"] == 2
    assert table["completions.ncols"] == 4  # step, prompt, completion, reward
    assert config["objective"] == "dpo" and config["objective_options"] == {"beta": 0.1}
    assert summary["final_model"] == str(tmp_path / "run-a" / "final")


def local_file_store(monkeypatch, tmp_path):
    """MLflow's plain-file store in tmp_path (MLflow 3 asks for an opt-in; it is the fastest local store)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_logger_local_store(tmp_path, monkeypatch):
    import mlflow

    local_file_store(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pref-test")
    logger = MlflowLogger(str(tmp_path / "run-b"), config=CONFIG)
    logger.log(1, {"loss": 0.5, "rewards/margins": 0.1})
    logger.log_completions(1, ROWS)
    logger.log(2, {"loss": 0.25, "rewards/margins": 0.3})
    logger.log_completions(2, ROWS[:1])
    logger.finish(str(tmp_path / "run-b" / "final"))
    logger.close()
    client = mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pref-test").experiment_id])
    table = mlflow.load_table("completions.json", run_ids=[run.info.run_id])
    assert table[["step", "completion", "reward"]].values.tolist() == [[1, "apple", 1.0], [1, "chair", 0.0], [2, "apple", 1.0]]
    assert run.info.run_name == "run-b" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "rewards/margins")] == [(1, 0.1), (2, 0.3)]
    assert run.data.params["objective"] == "dpo" and run.data.params["objective_options.beta"] == "0.1"
    assert run.data.tags["final_model"] == str(tmp_path / "run-b" / "final")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_an_mlflow_run_that_fails_is_not_left_running(tmp_path, monkeypatch):
    import gc

    import mlflow

    local_file_store(monkeypatch, tmp_path)
    logger = MlflowLogger(str(tmp_path / "run-f"), config=CONFIG)
    logger.log(1, {"loss": 0.5})
    logger.stop()  # the loop failed: no finish, no close
    run_id = logger.run_id
    del logger
    gc.collect()
    assert mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}").get_run(run_id).info.status == "FAILED"  # was RUNNING for ever


def local_trackio(monkeypatch, tmp_path):
    """Trackio's local store in tmp_path, project pref-test."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "pref-test")
    import trackio.sqlite_storage  # noqa: F401  (imported here so that it is patched below)

    # trackio reads TRACKIO_DIR once, at import, into several modules: an earlier test may have imported it
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("trackio") and hasattr(m, "TRACKIO_DIR")]:
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed")
def test_trackio_logger_local(tmp_path, monkeypatch):
    local_trackio(monkeypatch, tmp_path)
    logger = TrackioLogger(str(tmp_path / "run-c"), config=CONFIG)
    logger.log(1, {"loss": 0.5})
    logger.log(2, {"loss": 0.25})
    logger.log_completions(2, ROWS)
    logger.finish(str(tmp_path / "run-c" / "final"))
    logger.close()
    (db,) = glob.glob(str(tmp_path / "trackio" / "pref-test.db"))
    with sqlite3.connect(db) as connection:
        metrics = [(step, json.loads(m)) for step, m in connection.execute("select step, metrics from metrics where run_name = 'run-c' order by step")]
        (config,) = [json.loads(c) for (c,) in connection.execute("select config from configs where run_name = 'run-c'")]
        alerts = [text for (text,) in connection.execute("select text from alerts where run_name = 'run-c'")]
    assert [(step, m["loss"]) for step, m in metrics if "loss" in m] == [(1, 0.5), (2, 0.25)]
    (table,) = [m["completions"] for step, m in metrics if "completions" in m]
    assert table["_type"] == "trackio.table" and [(r["step"], r["completion"]) for r in table["_value"]] == [(2, "apple"), (2, "chair")]
    assert config["objective"] == "dpo"
    assert alerts == [str(tmp_path / "run-c" / "final")]


@pytest.mark.parametrize("logger, module", [(WandbLogger, "wandb"), (MlflowLogger, "mlflow"), (TrackioLogger, "trackio")])
def test_a_missing_tracker_names_its_extra(tmp_path, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(PrefError, match=rf"the {module} logger needs the {module} package: pip install 'pref\[{module}\]'"):
        logger(str(tmp_path))


@pytest.mark.parametrize("module", ["wandb", "mlflow", "trackio"])
def test_a_missing_tracker_stops_the_run_before_the_model_loads_or_anything_is_written(tmp_path, monkeypatch, prefs_file, module):
    monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "run"
    config = build_config(flags={**CONFIG, "dataset": [prefs_file], "loggers": ["jsonl", module], "output_dir": str(out)})
    with pytest.raises(PrefError, match=rf"^the {module} logger needs the {module} package: pip install 'pref\[{module}\]'$"):
        train(config, load_registry())  # the plan refuses it: no model is loaded (none is given, the default would be built)
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_a_wandb_run_that_cannot_start_is_a_one_line_error(tmp_path, monkeypatch):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")  # wandb online, never logged in

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(PrefError, match=r"^the wandb logger could not start a run: No API key configured. .* \(WANDB_MODE=offline needs no account\)$"):
        WandbLogger(str(tmp_path / "run"), config=CONFIG)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_an_mlflow_store_it_cannot_use_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://store")
    with pytest.raises(PrefError, match=r"^the mlflow logger could not start a run in nosuch://store \(MLFLOW_TRACKING_URI\): .*unsupported URI") as error:
        MlflowLogger(str(tmp_path / "run"), config=CONFIG)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_a_run_gives_the_tracker_its_config_metrics_and_final_model(tmp_path, monkeypatch, tiny_model_dir, prefs_file):
    import mlflow

    local_file_store(monkeypatch, tmp_path)
    out = str(tmp_path / "run")
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 2, "batch_size": 2,
                                 "device": "cpu", "output_dir": out, "loggers": ["jsonl", "mlflow"]})
    train(config, load_registry())
    client = mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pref").experiment_id])
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert set(run.data.metrics) == set(logged[-1]) - {"step"}  # the names of metrics.jsonl
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == pytest.approx([row["loss"] for row in logged])
    assert run.data.params["steps"] == "2" and run.data.params["model"] == tiny_model_dir
    assert run.data.tags["final_model"] == os.path.abspath(os.path.join(out, "final"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_a_wandb_run_resumed_from_a_checkpoint_goes_on_in_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run-w"
    first = WandbLogger(str(out), config=CONFIG)
    first.close()
    again = WandbLogger(str(out), config=CONFIG)  # no checkpoint: started again from step 0, a new W&B run
    again.close()
    assert again.run.id != first.run.id
    (out / "checkpoint-000002").mkdir()
    resumed = WandbLogger(str(out), config=CONFIG)
    resumed.close()
    assert resumed.run.id == again.run.id
    assert json.loads((out / "trackers.json").read_text()) == {"wandb": again.run.id}


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed")
def test_a_trackio_run_resumed_from_a_checkpoint_goes_on_in_its_trackio_run(tmp_path, monkeypatch):
    local_trackio(monkeypatch, tmp_path)
    out = tmp_path / "run-t"
    first = TrackioLogger(str(out), config=CONFIG)
    first.log(1, {"loss": 0.5})
    first.close()
    (out / "checkpoint-000001").mkdir()
    resumed = TrackioLogger(str(out), config=CONFIG)
    resumed.log(2, {"loss": 0.25})
    resumed.close()
    (db,) = glob.glob(str(tmp_path / "trackio" / "pref-test.db"))
    with sqlite3.connect(db) as connection:
        runs = {row[0] for row in connection.execute("select run_id from metrics where run_name = 'run-t'")}
        steps = [step for (step,) in connection.execute("select step from metrics where run_name = 'run-t' order by step")]
    assert len(runs) == 1 and steps == [1, 2]


def test_a_run_stopped_by_a_signal_and_resumed_is_one_mlflow_run(tmp_path, monkeypatch, tiny_model_dir, prefs_file):
    import signal

    import mlflow

    from pref.errors import RunInterrupted
    from pref.plugins.loggers import ProgressBar

    local_file_store(monkeypatch, tmp_path)
    out = str(tmp_path / "run")
    flags = {"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 4, "batch_size": 2, "device": "cpu",
             "output_dir": out, "loggers": ["jsonl", "mlflow"]}
    show = ProgressBar.show

    def signalled(self, step, metrics):
        show(self, step, metrics)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(ProgressBar, "show", signalled)
    with pytest.raises(RunInterrupted):
        train(build_config(flags=flags), load_registry())
    monkeypatch.setattr(ProgressBar, "show", show)
    client = mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (stopped,) = client.search_runs([client.get_experiment_by_name("pref").experiment_id])
    assert stopped.info.status == "FINISHED"  # closed with the checkpoint, not left RUNNING or marked FAILED

    train(build_config(flags={**flags, "resume": out, "lr": 2e-6}), load_registry())  # a resume may change the learning rate
    (run,) = client.search_runs([client.get_experiment_by_name("pref").experiment_id])
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["lr"] == stopped.data.params["lr"]  # MLflow's parameters cannot change; config.json has the new one
    assert run.data.tags["final_model"] == os.path.abspath(os.path.join(out, "final"))
