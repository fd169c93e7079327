"""Reading a run folder: its configuration, logged metrics, best step and generations."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pref.errors import PrefError

RUN_FILE = "run.json"  # the same names pref.train, pref.plugins.evaluators and the jsonl logger write
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.json"
GENERATIONS_FILE = "generations.jsonl"
COMPLETIONS_FILE = "completions.jsonl"  # --log-completions
#: Metrics that earlier versions of pref logged under another name, {objective ("*": any): {old name: today's name}}: a run is
#: read with today's names, so the runs a user logged before a rename still plot beside new ones.
RENAMED = {
    "*": {"loss/sft": "nll_loss"},  # the DPO family's NLL term, now under TRL's name (CPO's and ORPO's)
    # a reward model's scores: not DPO's implicit rewards, which the report draws under the old names
    "reward-model": {"rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward"},
    "sdft": {"distillation_loss": "self_distillation/distillation_loss"},  # TRL's SDFTTrainer's name, since 2026-12-02
}


@dataclass
class Run:
    """One run folder, read.

    name: the label of the run in legends (the folder's name).
    config: run.json's resolved configuration, the settings the run started with; versions: its library versions.
    resumes: run.json's resumes, each {"step": N, "changed": {setting: [old, new]}}: the settings a resume from
        step N's checkpoint changed (empty for a run never resumed with changes, and in a run.json older than them).
    rows: metrics.jsonl, one dict per logged step (`step` and the metrics of that step), metrics under today's names (RENAMED).
    best: best.json (`step`, `validation_loss`, `measure`) when the run kept a best model.
    generations: generations.jsonl rows (`step`, `prompt`, `text`).
    completions: completions.jsonl rows (`step`, `prompt`, `completion`, scores), with --log-completions.
    seconds: wall time from the run record (written once the model is loaded) to the last logged step,
        from the files' modification times; None if unknown.
    """

    path: str
    name: str
    config: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    generations: list[dict[str, Any]] = field(default_factory=list)
    completions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """The steps and values of `key` where it was logged as a finite number."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values

    def has(self, key: str) -> bool:
        return any(isinstance(row.get(key), (int, float)) and math.isfinite(row[key]) for row in self.rows)

    def keys(self) -> list[str]:
        """Every metric name logged at least once, in first-seen order."""
        return list(dict.fromkeys(key for row in self.rows for key in row if key != "step"))

    def last(self, key: str) -> float | None:
        """The last finite value logged for `key`."""
        _, values = self.series(key)
        return values[-1] if values else None

    @property
    def final_config(self) -> dict[str, Any]:
        """The settings the run ended with: `config` with every resume's changes."""
        return final_config({"config": self.config, "resumes": self.resumes})

    @property
    def last_step(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0


def final_config(record: dict[str, Any], before_step: float = math.inf) -> dict[str, Any]:
    """The settings a run ended with: run.json's `config` (those it started with) with each of its `resumes`' changes, in order.

    before_step: only the resumes from checkpoints before it (the settings a checkpoint of that step was trained with).
    """
    config = dict(record.get("config") or {})
    for resume in record.get("resumes") or []:
        if resume["step"] < before_step:
            config.update({key: new for key, (_, new) in resume["changed"].items()})
    return config


def with_todays_names(rows: list[dict[str, Any]], objective: Any) -> list[dict[str, Any]]:
    """`rows` with each metric RENAMED since the run logged it (for `objective`, the run's) under today's name."""
    names = {**RENAMED["*"], **RENAMED.get(objective, {})} if isinstance(objective, str) else RENAMED["*"]
    return [{names.get(key, key): value for key, value in row.items()} for row in rows]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a torn last line (a run still writing) is skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:  # damaged bytes spoil their line only
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_json(path: str) -> Any:
    """The JSON value in the file at `path`, or None when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError:  # not JSON, or not text
        return None


def is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_resumes(resumes: Any) -> bool:
    """Whether run.json's `resumes` has the shape pref writes: a list of {"step": N, "changed": {setting: [old, new]}}."""
    return isinstance(resumes, list) and all(
        isinstance(r, dict) and is_step(r.get("step")) and isinstance(r.get("changed"), dict)
        and all(isinstance(change, list) and len(change) == 2 for change in r["changed"].values())
        for r in resumes)


def load_run(path: str) -> Run:
    """Read the run folder at `path`; PrefError when it is not one or logged no metrics."""
    record_path = os.path.join(path, RUN_FILE)
    if not os.path.isfile(record_path):
        # the final model's folder (or a checkpoint's) is a natural thing to pass; its parent is the run. A path that is not
        # there is a mistake, not the run above it.
        parent = os.path.dirname(os.path.normpath(path))
        if os.path.isdir(path) and os.path.isfile(os.path.join(parent, RUN_FILE)):
            return load_run(parent)
        if not os.path.exists(path):
            raise PrefError(f"{path} does not exist; pass the --output-dir of a `pref run`")
        raise PrefError(f"{path} is not a pref run folder (no {RUN_FILE}); pass the --output-dir of a `pref run`")
    record = read_json(record_path)
    if not (isinstance(record, dict) and isinstance(record.get("config", {}), dict)
            and isinstance(record.get("versions", {}), dict) and valid_resumes(record.get("resumes", []))):
        raise PrefError(f"{record_path} is not a pref run record (damaged, or another program's); pass the --output-dir of a `pref run`")
    metrics_path = os.path.join(path, METRICS_FILE)
    # a row without a whole-number step is not one the jsonl logger wrote: skipped, as a torn line is
    rows = [row for row in read_jsonl(metrics_path) if isinstance(row, dict) and is_step(row.get("step"))] if os.path.isfile(metrics_path) else []
    if not rows:
        raise PrefError(f"{path} has no logged metrics ({METRICS_FILE} is missing or empty); runs log them with the default --logger jsonl")
    best_path = os.path.join(path, BEST_FILE)
    best = read_json(best_path) if os.path.isfile(best_path) else None
    if os.path.isfile(best_path) and not (isinstance(best, dict) and is_step(best.get("step"))):
        raise PrefError(f"{best_path} is not a pref best-model record (damaged, or another program's): "
                        f"move it out of {path} to report the run without it")
    generations_path = os.path.join(path, GENERATIONS_FILE)
    generations = [row for row in read_jsonl(generations_path) if isinstance(row, dict) and is_step(row.get("step"))
                   and isinstance(row.get("prompt"), str) and isinstance(row.get("text"), str)] if os.path.isfile(generations_path) else []
    completions_path = os.path.join(path, COMPLETIONS_FILE)
    completions = [row for row in read_jsonl(completions_path) if isinstance(row, dict) and is_step(row.get("step"))
                   and isinstance(row.get("completion"), str)] if os.path.isfile(completions_path) else []
    seconds = os.path.getmtime(metrics_path) - os.path.getmtime(record_path)
    return Run(
        path=path,
        name=os.path.basename(os.path.normpath(os.path.abspath(path))),
        config=record.get("config", {}),
        versions=record.get("versions", {}),
        resumes=record.get("resumes", []),
        rows=with_todays_names(rows, record.get("config", {}).get("objective")),
        best=best,
        generations=generations,
        completions=completions,
        seconds=seconds if seconds > 0 else None,
    )


def load_runs(paths: list[str]) -> list[Run]:
    """Several runs, each once in the order first given (`RUN`, `RUN/`, `RUN/final` and a link to it are one run); runs with the
    same folder name get their parent's name too, so legends tell them apart."""
    unique: dict[str, Run] = {}
    for run in map(load_run, paths):
        unique.setdefault(os.path.realpath(run.path), run)
    runs = list(unique.values())
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            parent = os.path.basename(os.path.dirname(os.path.normpath(os.path.abspath(run.path))))
            run.name = f"{parent}/{run.name}"
    return runs
