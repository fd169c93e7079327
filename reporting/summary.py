"""A run's configuration in a few words: objective, model, key options, steps, wall time, final values."""

from __future__ import annotations

from typing import Any

from pref.reporting.runs import Run

#: Configuration keys worth a glance besides the objective and model, when set.
KEY_SETTINGS = ("dataset", "reward", "selector", "embedder", "samples_per_prompt", "batch_size", "grad_accum", "lr", "seed", "curriculum")
#: Metrics whose last value the summary shows, when logged.
FINAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward/mean", "samples/distinct_ratio", "samples/entropy",
                 "validation/loss", "eval/gold_reward", "gold/labels_spent")


def model_name(config: dict[str, Any]) -> str:
    model = config.get("model")
    return model if model not in (None, "", "pref-default") else "pref-default"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def key_options(config: dict[str, Any]) -> list[str]:
    """`key=value` for the key settings that are set, then every plugin option (`reward.min_zipf=3`)."""
    items = [f"{key}={format_value(config[key])}" for key in KEY_SETTINGS if config.get(key) not in (None, [], {}, False)]
    for group in ("objective", "reward", "dataset", "selector", "curriculum"):
        for key, value in (config.get(f"{group}_options") or {}).items():
            items.append(f"{key}={format_value(value)}" if group == "objective" else f"{group}.{key}={format_value(value)}")
    return items


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def summary(run: Run) -> dict[str, str]:
    """Run name -> its summary fields, in display order."""
    planned = run.config.get("steps")
    steps = f"{run.last_step} of {planned}" if planned and planned != run.last_step else str(run.last_step)
    return {
        "run": run.name,
        "objective": str(run.config.get("objective", "?")),
        "model": model_name(run.config),
        "options": ", ".join(key_options(run.config)) or "defaults",
        "steps": steps,
        "wall time": duration(run.seconds),
        "pref": run.versions.get("pref", "?"),
    }


def final_values(run: Run) -> dict[str, str]:
    """The last logged value of each of FINAL_METRICS the run logged, and the best step."""
    values = {key: format_value(run.last(key)) for key in FINAL_METRICS if run.last(key) is not None}
    if run.best:
        values["best/ step"] = str(run.best["step"])
    return values
