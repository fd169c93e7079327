"""A run's configuration in a few words: objective, model, key options, steps, wall time, final values."""

from __future__ import annotations

from typing import Any

from pref.reporting.runs import Run

#: Configuration keys shown whenever set, besides the objective and model.
KEY_SETTINGS = ("dataset", "reward", "lr", "batch_size", "seed")
#: Keys about where and how a run was kept or run, not what it trained: never shown.
HOUSEKEEPING = ("output_dir", "resume", "device", "save_every", "keep_checkpoints", "loggers", "progress", "threads", "log_every")
#: Metrics whose last value the summary shows, when logged.
FINAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward/mean", "samples/distinct_ratio", "samples/entropy",
                 "validation/loss", "eval/reward", "eval/gold_reward", "gold/labels_spent")


def model_name(config: dict[str, Any]) -> str:
    model = config.get("model")
    return model if model not in (None, "", "pref-default") else "pref-default"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def defaults_for(config: dict[str, Any]) -> dict[str, Any]:
    """pref's defaults for a run on the same model (learning rate and threads depend on it), those the plan resolves (temperature,
    ...) as it does: a run.json that recorded them (as older ones did) shows and reproduces them as defaults."""
    from pref.config import build_config
    from pref.plan import PLAN_DEFAULTS

    return {**build_config(flags={"model": config.get("model")}).to_dict(), **PLAN_DEFAULTS}


def key_options(config: dict[str, Any]) -> list[str]:
    """`key=value` for KEY_SETTINGS when set, every other setting that differs from the default, then every
    plugin option (`beta=0.2` for the objective's, `reward.min_zipf=3` for the others)."""
    defaults = defaults_for(config)
    items = [f"{key}={format_value(config[key])}" for key in KEY_SETTINGS if config.get(key) not in (None, [], {})]
    for key, value in config.items():
        if key in KEY_SETTINGS or key in HOUSEKEEPING or key in ("objective", "model") or key.endswith("_options") or value in (None, defaults.get(key)):
            continue
        items.append(f"{key}={format_value(value)}")
    for group in ("objective", "reward", "dataset", "selector", "embedder", "curriculum"):
        for key, value in (config.get(f"{group}_options") or {}).items():
            items.append(f"{key}={format_value(value)}" if group == "objective" else f"{group}.{key}={format_value(value)}")
    return items


def resumed(run: Run) -> list[str]:
    """What each resume of the run changed, `from step N: key=new`, after the settings the run started with."""
    return [f"from step {resume['step']}: " + ", ".join(f"{key}={format_value(new)}" for key, (_, new) in resume["changed"].items())
            for resume in run.resumes]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def summary(run: Run) -> dict[str, str]:
    """Run name -> its summary fields, in display order."""
    planned = run.final_config.get("steps")
    steps = f"{run.last_step} of {planned}" if planned and planned != run.last_step else str(run.last_step)
    return {
        "run": run.name,
        "objective": str(run.config.get("objective", "?")),
        "model": model_name(run.config),
        "options": ", ".join(key_options(run.config) + resumed(run)) or "defaults",
        "steps": steps,
        "training time": duration(run.seconds),
        "pref": run.versions.get("pref", "?"),
    }


def final_values(run: Run) -> dict[str, str]:
    """The last logged value of each of FINAL_METRICS the run logged, and the best step."""
    values = {key: format_value(run.last(key)) for key in FINAL_METRICS if run.last(key) is not None}
    if run.best:
        values["best/ step"] = str(run.best["step"])
    return values
