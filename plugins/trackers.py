"""Experiment trackers as metrics loggers: Weights & Biases, MLflow and Trackio.

Each is an optional extra (`pip install pref[wandb]`, `pref[mlflow]`, `pref[trackio]`).
Metrics go under the names of metrics.jsonl, the run's configuration (run.json's
`config`) becomes the tracker's configuration or parameters, and the final model's
folder is recorded when the run ends. Where the tracker sends its data is its own
setting, read from its usual environment variables (WANDB_MODE, WANDB_PROJECT,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, TRACKIO_DIR, ...); the project is
`pref` unless they name one, and the tracker's run is named after the run folder.

A pref run resumed from a checkpoint (after a stop signal, a preemption, a crash) goes on in
the tracker run it started: each tracker's run id is kept in the run folder's `trackers.json`.
A run started again from step 0 gets a new tracker run.
"""

from __future__ import annotations

import importlib
import json
import os
import weakref
from typing import Any

from pref.checkpoint import list_checkpoints
from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import MetricsLogger

PROJECT = "pref"
#: In the run folder: the run each tracker logs to, so a resumed pref run goes on in it.
RUNS_FILE = "trackers.json"


def need(module: str, logger: str) -> Any:
    """Import the tracker's package, or fail with the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PrefError(f"the {logger} logger needs the {logger} package: pip install 'pref[{logger}]'") from None


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def earlier_run(output_dir: str, tracker: str) -> str | None:
    """The id of the tracker run this run folder logged to before, if the run resumes from a checkpoint of it."""
    if not list_checkpoints(output_dir):  # a fresh start, or one again from step 0: a new tracker run
        return None
    try:
        with open(os.path.join(output_dir, RUNS_FILE), encoding="utf-8") as f:
            runs = json.load(f)
    except (OSError, ValueError):
        return None
    run = runs.get(tracker) if isinstance(runs, dict) else None
    return run if isinstance(run, str) and run else None


def remember_run(output_dir: str, tracker: str, run_id: str) -> None:
    """Keep `run_id` as the tracker's run of this run folder (written whole, then moved into place)."""
    path, partial = os.path.join(output_dir, RUNS_FILE), os.path.join(output_dir, f".tmp-{RUNS_FILE}")  # a run cleans up .tmp- files
    try:
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
    except (OSError, ValueError):
        runs = {}
    runs = {**(runs if isinstance(runs, dict) else {}), tracker: run_id}
    os.makedirs(output_dir, exist_ok=True)
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=2)
    os.replace(partial, path)


def run_name(output_dir: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir)))


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as dotted keys (`objective_options.beta`), for trackers whose parameters are flat."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def completion_table(step: int, rows: list[dict[str, Any]]) -> Any:
    """A logged step's completions as a pandas table, a column `step` first (TRL's `completions` table)."""
    import pandas

    return pandas.DataFrame([{"step": step, **{key: str(value) if key == "prompt" else value for key, value in row.items()}} for row in rows])


class WandbLogger(MetricsLogger):
    """A Weights & Biases run: metrics per step, the configuration as `config`, the final model in the summary.

    Files go under the run folder (`wandb/`) unless WANDB_DIR says otherwise; WANDB_MODE=offline works without a network.
    A resumed pref run goes on in the W&B run it started (its id, `resume="allow"`).
    """

    def __init__(self, output_dir: str, config: dict[str, Any] | None = None):
        wandb = need("wandb", "wandb")
        earlier = earlier_run(output_dir, "wandb")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or PROJECT,
                name=run_name(output_dir),
                dir=os.environ.get("WANDB_DIR") or output_dir,
                config=config or {},
                **({"id": earlier, "resume": "allow"} if earlier else {}),
            )
        except wandb.Error as error:  # no API key, no network, a bad setting
            raise PrefError(f"the wandb logger could not start a run: {one_line(error)} (WANDB_MODE=offline needs no account)") from None
        remember_run(output_dir, "wandb", self.run.id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        import wandb

        self.run.log({"completions": wandb.Table(dataframe=completion_table(step, rows))}, step=step)

    def finish(self, final_dir: str) -> None:
        self.run.summary["final_model"] = os.path.abspath(final_dir)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(MetricsLogger):
    """An MLflow run: metrics per step, the configuration as parameters (dotted keys) and as `config.json`,
    the final model's folder as the tag `final_model`.

    The tracking store is MLflow's own setting (MLFLOW_TRACKING_URI); the experiment is
    MLFLOW_EXPERIMENT_NAME or `pref`. A run that fails (the loop then never calls `close`) is
    marked FAILED when the logger is collected or the process exits, not left RUNNING. A resumed
    pref run goes on in the MLflow run it started, if the store still holds it; MLflow's parameters
    cannot change, so a resume's new settings are in `config.json` (and run.json), and only new keys become parameters.
    """

    def __init__(self, output_dir: str, config: dict[str, Any] | None = None):
        mlflow = need("mlflow", "mlflow")
        try:
            self.client, self.mlflow_errors = mlflow.MlflowClient(), mlflow.exceptions.MlflowException
            earlier, logged = self.earlier_run(output_dir), {}
            if earlier is not None:
                self.run_id, logged = earlier.info.run_id, earlier.data.params
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                self.run_id = self.client.create_run(experiment_id, run_name=run_name(output_dir)).info.run_id
        except mlflow.exceptions.MlflowException as error:  # a store it cannot use or reach
            raise PrefError(f"the mlflow logger could not start a run in {mlflow.get_tracking_uri()} (MLFLOW_TRACKING_URI): {one_line(error)}") from None
        remember_run(output_dir, "mlflow", self.run_id)
        config = config or {}
        params = [mlflow.entities.Param(key, str(value)[:6000]) for key, value in flat(config).items() if key not in logged]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_dict(self.run_id, config, "config.json")
        self.mlflow = mlflow
        # unlike wandb and trackio, an MLflow client run has no exit hook of its own
        self.failed = weakref.finalize(self, self.client.set_terminated, self.run_id, "FAILED")

    def earlier_run(self, output_dir: str) -> Any:
        """The MLflow run this run folder logged to before, if the store holds it (another MLFLOW_TRACKING_URI may not)."""
        run_id = earlier_run(output_dir, "mlflow")
        if run_id is None:
            return None
        try:
            return self.client.get_run(run_id)
        except self.mlflow_errors:  # not in this store
            return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [self.mlflow.entities.Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.client.log_table(self.run_id, data=completion_table(step, rows), artifact_file="completions.json")  # appended to

    def finish(self, final_dir: str) -> None:
        self.client.set_tag(self.run_id, "final_model", os.path.abspath(final_dir))

    def close(self) -> None:
        self.failed.detach()
        self.client.set_terminated(self.run_id)


class TrackioLogger(MetricsLogger):
    """A Trackio run (local, in TRACKIO_DIR, unless a Space is configured): metrics per step, the configuration
    as `config`, the final model's folder in an info alert (Trackio's configuration is fixed at start).
    """

    def __init__(self, output_dir: str, config: dict[str, Any] | None = None):
        self.trackio = need("trackio", "trackio")
        resume = "allow" if earlier_run(output_dir, "trackio") else "never"  # by name: only this folder's own run, not a namesake's
        self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT") or PROJECT, name=run_name(output_dir), config=config or {},
                                     resume=resume)
        remember_run(output_dir, "trackio", run_name(output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.run.log({"completions": self.trackio.Table(dataframe=completion_table(step, rows))}, step=step)

    def finish(self, final_dir: str) -> None:
        self.run.alert(title="final model", text=os.path.abspath(final_dir), level=self.trackio.AlertLevel.INFO)

    def close(self) -> None:
        self.run.finish()


@hookimpl
def register_loggers(register):
    # no square brackets in descriptions: `pref list-plugins` prints them through rich, which reads [..] as markup
    # the packages are checked when the run is planned: the loggers are built after the model load
    register("wandb", WandbLogger, "Weights & Biases run; needs the wandb extra of pref; WANDB_MODE=offline works without a network",
             requires={"wandb": "pref[wandb]"})
    register("mlflow", MlflowLogger, "MLflow run in MLFLOW_TRACKING_URI's store; needs the mlflow extra of pref", requires={"mlflow": "pref[mlflow]"})
    register("trackio", TrackioLogger, "Trackio run, local by default; needs the trackio extra of pref", requires={"trackio": "pref[trackio]"})
