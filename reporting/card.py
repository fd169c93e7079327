"""The model card written into a run's `final/` folder: Hugging Face YAML metadata and a short account of the run.

The metadata follows the Hub's model card fields (`base_model`, `library_name`,
`pipeline_tag`, `tags`, `datasets`), so `huggingface_hub.ModelCard.load` and the Hub read
it as-is. The body says how the model was trained, its last logged metrics, pref's
version and the `pref run` command that trains it again (a resumed run's: that command,
then the `pref run --resume` of each resume that changed settings).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any

import yaml

from pref.reporting.runs import METRICS_FILE, RUN_FILE, final_config, read_jsonl
from pref.reporting.summary import FINAL_METRICS, defaults_for, format_value, model_name

CARD_FILE = "README.md"
#: Settings the command always spells out, even at their default, so the reader sees them.
ALWAYS_SHOWN = ("objective", "model", "steps", "seed")
#: Settings that say where and how the run was kept, not what was trained: left out of the command.
NOT_REPRODUCED = ("output_dir", "resume", "device", "save_every", "keep_checkpoints", "loggers")
#: The `pref run` flags the command spells settings with (the other settings go into a --config file).
FLAGS = {
    "objective": "--objective", "dataset": "--dataset", "reward": "--reward", "selector": "--selector", "embedder": "--embedder",
    "model": "--model", "steps": "--steps", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr",
    "samples_per_prompt": "--samples-per-prompt", "seed": "--seed", "mixed_precision": "--mixed-precision", "threads": "--threads",
    "reference": "--reference", "eval_every": "--eval-every", "validation_split": "--validation-split",
    "validation_dataset": "--validation-dataset", "test_prompts": "--test-prompt", "objective_options": "-o",
    "reward_options": "--reward-option", "dataset_options": "--dataset-option", "selector_options": "--selector-option",
    "curriculum_options": "--curriculum-option", "adapter": "--adapter", "adapter_options": "--adapter-option",
    "quantize": "--quantize",
}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv")


def hub_datasets(entries: list[str], builders: set[str]) -> list[str]:
    """The `--dataset` entries that name Hub datasets: `org/name`, not a local path, a data file or a builder."""
    return [e for e in entries if HUB_NAME.match(e) and e not in builders and not os.path.exists(os.path.expanduser(e))
            and not e.lower().endswith(DATA_SUFFIXES)]


def option_text(value: Any) -> str:
    """The VALUE of a KEY=VALUE flag that `pref run` reads back (as YAML) as `value` itself."""
    from pref.config import read_yaml

    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() if not isinstance(value, str) else value
    # a text YAML reads as something else ("yes", "1e-3", "a: b", "x #y", a line break) goes in JSON's quotes, which YAML reads
    return text if (read_yaml(text) if text else "") == value else json.dumps(value)


def reproduce(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The `pref run` command for `config`, and the settings it needs in a --config file (keys not in FLAGS).

    Only settings that differ from pref's defaults for the same model are given, besides ALWAYS_SHOWN.
    """
    defaults = defaults_for(config)
    given = {key: value for key, value in config.items() if key in ALWAYS_SHOWN or value != defaults.get(key)}
    return spell(["pref", "run"], given, config, "run-config.yaml")


def resume_command(name: str, resume: dict[str, Any], config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The `pref run --resume` command of one of run.json's `resumes` of the run folder `name`, and its --config file's settings.

    config: the settings the run ended with (for an embedder's model).
    """
    checkpoint = os.path.join(name, f"checkpoint-{resume['step']:06d}")
    changed = {key: new for key, (_, new) in resume["changed"].items()}
    return spell(["pref", "run", "--resume", checkpoint], changed, config, f"resume-{resume['step']}.yaml")


def spell(args: list[str], settings: dict[str, Any], config: dict[str, Any], config_file: str) -> tuple[str, dict[str, Any]]:
    """`args` and the flags of `settings` as one shell command, and the settings no flag spells (they go in `config_file`)."""
    args, extra = list(args), {}
    for key, value in settings.items():
        if key in NOT_REPRODUCED or value is None:
            continue
        if key == "embedder_options":  # its model is spelled into --embedder NAME:MODEL below; other options need the file
            rest = {k: v for k, v in value.items() if k != "model"}
            if rest:
                extra[key] = rest
            continue
        if key == "embedder" and (config.get("embedder_options") or {}).get("model"):
            value = f"{value}:{config['embedder_options']['model']}"
        if key == "curriculum":
            args.append("--curriculum" if value else "--no-curriculum")
        elif key.endswith("_options") and key in FLAGS:
            args += [part for k, v in value.items() for part in (FLAGS[key], f"{k}={option_text(v)}")]
        elif key in FLAGS and isinstance(value, list):
            args += [part for item in value for part in (FLAGS[key], str(item))]
        elif key in FLAGS:
            args += [FLAGS[key], str(value)]
        else:
            extra[key] = value
    if extra:
        args += ["--config", config_file]
    return " ".join(shlex.quote(a) for a in args), extra


def last_values(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Metric -> (last finite value, its step), for the main metrics of FINAL_METRICS."""
    out = {}
    for row in rows:
        for key in FINAL_METRICS:
            value = row.get(key)
            if isinstance(value, (int, float)) and value == value:
                out[key] = (float(value), int(row["step"]))
    return {key: out[key] for key in FINAL_METRICS if key in out}


def model_card(record: dict[str, Any], rows: list[dict[str, Any]], pipeline_tag: str = "text-generation", name: str = "") -> str:
    """The card's text: YAML front matter, then Markdown.

    record: run.json (`config`, `versions`, `plugins`, and `resumes` where a resume changed settings); rows: metrics.jsonl rows (may be empty).
    """
    config = record.get("config", {})
    versions = record.get("versions", {})
    objective = str(config.get("objective", "unknown"))
    builders = {p["name"] for p in record.get("plugins", []) if p.get("kind") == "dataset"}
    datasets = hub_datasets(list(config.get("dataset") or []), builders)
    metadata: dict[str, Any] = {
        "base_model": model_name(config),
        # final/ of an adapter run holds the adapter alone, in peft's format: the Hub loads it with peft, onto base_model
        "library_name": "peft" if config.get("adapter") else "transformers",
        "pipeline_tag": pipeline_tag,
        "tags": list(dict.fromkeys(["pref", objective, "preference-optimization", *([config["adapter"]] if config.get("adapter") else [])])),
    }
    if datasets:
        metadata["datasets"] = datasets

    options = config.get("objective_options") or {}
    lines = [f"# {name or objective}", "",
             f"{model_name(config)} trained with the **{objective}** objective of pref {versions.get('pref', '')}.".replace(" .", "."), "", "## Training", "",
             f"- objective: `{objective}`" + (f", options: {', '.join(f'`{k}={format_value(v)}`' for k, v in options.items())}" if options else "")]
    if config.get("dataset"):
        lines.append(f"- data: {', '.join(f'`{d}`' for d in config['dataset'])}")
    if config.get("reward"):
        reward_options = config.get("reward_options") or {}
        rewards = config["reward"] if isinstance(config["reward"], list) else [config["reward"]]
        weights = config.get("reward_weights")
        named = ", ".join(f"`{name}`" + (f" x {format_value(weights[i])}" if weights else "") for i, name in enumerate(rewards))
        lines.append(f"- reward: {named}" + (f", options: {', '.join(f'`{k}={format_value(v)}`' for k, v in reward_options.items())}" if reward_options else ""))
    resumes, final = record.get("resumes") or [], final_config(record)
    last_step = int(rows[-1]["step"]) if rows else None
    steps = f"{config.get('steps')}" + (f" (stopped after {last_step})" if last_step is not None and last_step != final.get("steps") else "")
    lines += [f"- steps: {steps}, batch size {config.get('batch_size')}, gradient accumulation {config.get('grad_accum')}, "
              f"peak learning rate {format_value(config.get('lr'))} ({config.get('schedule')} schedule)",
              f"- seed: {config.get('seed')}"]
    for resume in resumes:
        shown = [(key, *("none" if value in (None, []) else format_value(value) for value in values)) for key, values in resume["changed"].items()]
        changes = ", ".join(f"`{key}` {old} -> {new}" for key, old, new in shown)
        lines.append(f"- resumed from the checkpoint of step {resume['step']} with {changes}")
    finals = last_values(rows)
    if finals:
        lines += ["", "## Final metrics", "", "Last logged values (metrics.jsonl of the run):", "", "| metric | value | step |", "|---|---|---|"]
        lines += [f"| `{key}` | {format_value(value)} | {step} |" for key, (value, step) in finals.items()]
    command, extra = reproduce(config)
    folder = name or "RUN"
    if resumes:  # where the resumes find their checkpoints, every one of them kept
        every, last = config.get("save_every") or 1, max(int(config.get("steps") or 1), max(int(r["step"]) for r in resumes))
        command += f" --save-every {every} --keep-checkpoints {max(1, -(-last // every))} --output-dir {shlex.quote(folder)}"
    lines += ["", "## Reproduce", "", "```bash", command, "```"]
    if extra:
        lines += ["", "with `run-config.yaml` holding the settings the command does not spell out:", "", "```yaml", yaml.safe_dump(extra, sort_keys=False).strip(), "```"]
    if resumes:
        commands = [resume_command(folder, resume, final) for resume in resumes]
        lines += ["", "The run was resumed with other settings: after that command, which keeps the checkpoints they start from, "
                  "run these in order:", "", "```bash", *(command for command, _ in commands), "```"]
        for resume, (_, extra) in zip(resumes, commands):
            if extra:
                lines += ["", f"with `resume-{resume['step']}.yaml` holding:", "", "```yaml", yaml.safe_dump(extra, sort_keys=False).strip(), "```"]
    shown = ("pref", "torch", "transformers", "accelerate")
    lines += ["", "## Versions", "", ", ".join(f"{p} {versions[p]}" for p in shown if p in versions), ""]
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines)


def is_classifier(folder: str) -> bool:
    """Whether the model in `folder` is a sequence classifier: its config.json's architecture, or an adapter's peft task type."""
    for name, says in [("config.json", lambda c: any(a.endswith("ForSequenceClassification") for a in c.get("architectures") or [])),
                       ("adapter_config.json", lambda c: c.get("task_type") == "SEQ_CLS")]:  # an adapter run's final/ has no config.json
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                if says(json.load(f)):
                    return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def write_model_card(run_dir: str, model_dir: str = "final") -> str:
    """Write RUN_DIR/MODEL_DIR/README.md from the run's run.json and metrics.jsonl; returns its path."""
    with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
        record = json.load(f)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    rows = [row for row in read_jsonl(metrics_path) if "step" in row] if os.path.exists(metrics_path) else []
    folder = os.path.join(run_dir, model_dir)
    pipeline_tag = "text-classification" if is_classifier(folder) else "text-generation"  # a reward model, or a policy
    path = os.path.join(folder, CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(record, rows, pipeline_tag, os.path.basename(os.path.normpath(os.path.abspath(run_dir)))))
    return path
