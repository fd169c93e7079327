"""DivPO against online DPO, GRPO and RLOO on the noun task, from the embedded default model.

    python bench/divpo_nouns.py [--steps N] [--seeds N] [--workers N] [--methods 'LABEL;...'] [--results PATH]

Each run is `pref run` with its defaults on the embedded default model, the way a user
would start it; only these differ:

- online DPO: `--objective online-dpo --reward noun-diversity -o sft_weight=W` (best vs
  worst by reward), W being DivPO's default SFT weight;
- online DPO with its own default SFT weight, 0, for reference;
- DivPO: `--objective divpo -o criterion=C` for each diversity criterion C
  (probability, frequency, semantic);
- GRPO and RLOO: `--objective grpo --reward noun-diversity` and `--objective rloo
  --reward noun-diversity` with TRL's defaults (group-normalised advantages and the dapo
  loss; a leave-one-out baseline and beta 0.05), which learn from all K samples of each
  prompt instead of one pair, under the same budget (steps, learning rate, prompts per
  step, K, temperature, max new tokens; the script checks).

Both objectives are DPO on one pair per prompt; online DPO (the first) and DivPO share
the step budget, learning rate, prompts per step, K samples per prompt, beta and SFT
weight (the script checks), so only the pair selector differs. An online DPO run may
stop before the step budget: once every sample earns the same reward there is no pair
left to train on.

Every trained model, and the untrained one, is evaluated with `pref.reporting.evaluate.evaluate`
and the noun-diversity reward's `report`: 200 answers spread over the reward's default
prompts, temperature 1, at most 8 new tokens, sampling seed 0. Training runs use seeds
0 to N-1; each figure is the mean over them (and the range when N > 1).

Runs are independent processes, `--workers` at a time (default: 2, or 1 on a single
core): the embedded default model trains on one thread, so two runs share two cores
without slowing each other much. The table goes to stdout and to
bench/results/divpo_nouns.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from machine import machine  # bench/machine.py (bench/ is on sys.path when a script runs)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "divpo_nouns.md")
REWARD = "noun-diversity"
SAMPLES = 200
EVAL_SEED = 0
EVAL_MAX_NEW_TOKENS = 8
CRITERIA = ("probability", "frequency", "semantic")


def divpo_default(option: str):
    from pref.plugins.divpo import DivPO

    return inspect.signature(DivPO).parameters[option].default


# label -> the `pref run` flags that differ from its defaults; online DPO gets DivPO's loss
ONLINE = "online DPO"
METHODS = {
    ONLINE: {"objective": "online-dpo", "reward": REWARD, "objective_options": {"sft_weight": divpo_default("sft_weight")}},
    "online DPO, its own sft_weight 0": {"objective": "online-dpo", "reward": REWARD},
}
METHODS.update({f"DivPO, {c}": {"objective": "divpo", "objective_options": {"criterion": c}} for c in CRITERIA})
METHODS.update({"GRPO": {"objective": "grpo", "reward": REWARD}, "RLOO": {"objective": "rloo", "reward": REWARD}})
#: What every method shares, GRPO and RLOO included: the sampling and step budget.
BUDGET = ("steps", "lr", "prompts per step", "K samples per prompt", "temperature", "max new tokens", "threads")
FIGURES = ("valid_rate", "unique_valid", "dat_score", "distinct_ratio")


def evaluate_policy(policy) -> dict[str, float]:
    """The noun-diversity report of `policy` over the reward's default prompts."""
    from pref.reporting.evaluate import evaluate
    from pref.interfaces import SamplingConfig
    from pref.registry import load_registry

    reward = load_registry().create("reward", REWARD, {})
    sampling = SamplingConfig(max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=1.0)
    report = evaluate(policy, reward, list(reward.default_prompts), SAMPLES, sampling, seed=EVAL_SEED)
    return {key: report.get(key, float("nan")) for key in FIGURES}


def evaluate_untrained() -> dict[str, float]:
    import torch

    from pref.config import build_config
    from pref.policy import HFPolicy

    torch.set_num_threads(build_config().threads or torch.get_num_threads())  # as a run would
    return evaluate_policy(HFPolicy.load(None))


def train_and_evaluate(label: str, flags: dict, steps: int | None, seed: int, work_dir: str) -> dict:
    """One `pref run` in this process, then the evaluation of its model; progress output is dropped."""
    sys.stderr = open(os.devnull, "w")  # runs go side by side: their progress bars would interleave
    from pref.config import build_config
    from pref.registry import load_registry
    from pref.train import train_policy

    name = "-".join(re.findall(r"[a-z0-9]+", label.lower())) + f"-seed{seed}"
    config = build_config(flags={**flags, "seed": seed, "output_dir": os.path.join(work_dir, name), **({"steps": steps} if steps else {})})
    start = time.perf_counter()
    out_dir, policy = train_policy(config, load_registry())
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    # medians: the first step of a process also loads WordNet
    split = {key: statistics.median(m[key] for m in lines) for key in ("time/sampling", "time/scoring", "time/update")}
    return {"seed": seed, "steps_run": lines[-1]["step"], "train_s": seconds, "step_s": split, **evaluate_policy(policy)}


def resolved_settings(flags: dict, steps: int | None) -> dict[str, object]:
    """The settings a method's runs resolve to (its loss settings where it has them)."""
    from pref.config import build_config
    from pref.plan import PLAN_DEFAULTS
    from pref.registry import load_registry

    config = build_config(flags={**flags, **({"steps": steps} if steps else {})})
    objective = load_registry().create("objective", config.objective, config.objective_options)
    reward = load_registry().create("reward", REWARD, {})
    settings = {
        "steps": config.steps,
        "lr": config.lr,
        "prompts per step": config.batch_size,
        "K samples per prompt": config.samples_per_prompt or objective.needs.samples_per_prompt,
        "beta": getattr(objective, "beta", None),
        "sft_weight": getattr(objective, "sft_weight", None),
        "loss": getattr(objective, "loss_type", None),
        "temperature": PLAN_DEFAULTS["temperature"] if config.temperature is None else config.temperature,  # as the plan resolves it
        "max new tokens": config.max_new_tokens or reward.max_new_tokens,
        "threads": config.threads,
    }
    return settings


def shared_settings(steps: int | None, labels: list[str]) -> dict[str, object]:
    """The resolved settings of each objective's runs: online DPO's and DivPO's must be equal,
    and every method's budget (BUDGET) the same."""
    settings = resolved_settings(METHODS[ONLINE], steps)
    divpo = resolved_settings(METHODS[f"DivPO, {divpo_default('criterion')}"], steps)
    if settings != divpo:
        raise SystemExit(f"online DPO and DivPO would train with different settings: {settings} vs {divpo}")
    for label in labels:
        budget = {key: value for key, value in resolved_settings(METHODS[label], steps).items() if key in BUDGET}
        if budget != {key: settings[key] for key in BUDGET}:
            raise SystemExit(f"{label} would train under another budget than online DPO: {budget}")
    return settings


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def summary(values: list[float], digits: int) -> str:
    """The mean, and the range when there are several values."""
    mean = statistics.mean(values)
    if len(values) == 1 or min(values) == max(values):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def goal_rows(results: dict[str, list[dict]], base: dict[str, float], online: list[dict]) -> list[str]:
    """Each DivPO criterion against the goals: valid rate +30 points over the untrained model and
    within 10 of online DPO; unique valid nouns at least 2x the untrained model's and online DPO's."""
    mean = lambda runs, key: statistics.mean(r[key] for r in runs)  # noqa: E731
    rows = []
    for criterion in CRITERIA:
        runs = results[f"DivPO, {criterion}"]
        over_base = 100 * (mean(runs, "valid_rate") - base["valid_rate"])
        under_online = 100 * (mean(online, "valid_rate") - mean(runs, "valid_rate"))
        times_base = mean(runs, "unique_valid") / base["unique_valid"]
        times_online = mean(runs, "unique_valid") / mean(online, "unique_valid")
        met = [over_base >= 30, under_online <= 10, times_base >= 2, times_online >= 2]
        mark = lambda ok: "yes" if ok else "**no**"  # noqa: E731
        label = criterion + (" (default)" if criterion == divpo_default("criterion") else "")
        rows.append(
            f"| {label} | {over_base:+.1f} ({mark(met[0])}) | {-under_online:+.1f} ({mark(met[1])}) "
            f"| x{times_base:.1f} ({mark(met[2])}) | x{times_online:.1f} ({mark(met[3])}) | {'all' if all(met) else f'{sum(met)} of 4'} |"
        )
    return rows


def report(results: dict[str, list[dict]], base: dict[str, float], settings: dict, seeds: int, workers: int, minutes: float, loads: tuple[str, str]) -> str:
    lines = [
        "# DivPO vs online DPO, GRPO and RLOO on the noun task",
        "",
        f"Machine: {machine()}. {workers} runs at a time. Load average (1 min) {loads[0]} at the start, {loads[1]} at the end; the bench took {minutes:.1f} min.",
        "",
        "Model: the embedded default (`pref-default`). Training: `pref run` defaults, the same for online DPO and every DivPO run "
        "(the second online DPO row alone differs, in its sft_weight; GRPO and RLOO share the budget: steps, lr, prompts per step, "
        "K, temperature, max new tokens, threads, with their own TRL-default losses): "
        + ", ".join(f"{k} {v}" for k, v in settings.items())
        + (f". Figures are the mean over {seeds} training seeds (0 to {seeds - 1}), with the range in brackets." if seeds > 1 else
           ". One training seed (0) only: no spread is shown."),
        f"Evaluation: `pref.reporting.evaluate.evaluate` with the {REWARD} reward's `report`: {SAMPLES} answers over its {len(_prompts())} default prompts, "
        f"temperature 1, at most {EVAL_MAX_NEW_TOKENS} new tokens, sampling seed {EVAL_SEED}.",
        "",
        "| model | valid rate | unique valid nouns (of 200) | DAT-style score | distinct ratio | steps run | train s/run | median s/step: sampling / scoring / update |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| untrained | {base['valid_rate']:.3f} | {base['unique_valid']:.0f} | {base['dat_score']:.1f} | {base['distinct_ratio']:.3f} | 0 | | |",
    ]
    for label, runs in results.items():
        get = lambda key: [r[key] for r in runs]  # noqa: E731
        split = " / ".join(f"{statistics.mean(r['step_s'][k] for r in runs):.3f}" for k in ("time/sampling", "time/scoring", "time/update"))
        label = label + (" (default)" if label == f"DivPO, {divpo_default('criterion')}" else "")
        lines.append(
            f"| {label} | {summary(get('valid_rate'), 3)} | {summary(get('unique_valid'), 1)} | {summary(get('dat_score'), 1)} "
            f"| {summary(get('distinct_ratio'), 3)} | {summary(get('steps_run'), 0)} | {statistics.mean(get('train_s')):.0f} | {split} |"
        )
    lines += ["", f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'bench/divpo_nouns.py', *sys.argv[1:]])}`", ""]
    if not all(label in results for label in [ONLINE] + [f"DivPO, {c}" for c in CRITERIA]):
        return "\n".join(lines)  # a partial run (--methods): no goals to judge
    online = results[ONLINE]
    lines[-2:-2] = [
        "Goals, from the means: DivPO's valid rate at least 30 points above the untrained model's and at most 10 below online DPO's; "
        "its unique valid nouns at least twice the untrained model's and twice online DPO's.",
        "",
        "| DivPO criterion | valid rate vs untrained, points | vs online DPO, points | unique valid vs untrained | vs online DPO | goals met |",
        "|---|---:|---:|---:|---:|---|",
        *goal_rows(results, base, online),
        "",
    ]
    return "\n".join(lines)


def _prompts() -> list[str]:
    from pref.plugins.noun_diversity import NounDiversityReward

    return NounDiversityReward.default_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: pref run's)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method (default 3)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    parser.add_argument("--methods", help=f"only these rows, separated by ';' (labels hold commas; default all: {'; '.join(METHODS)})")
    parser.add_argument("--results", default=RESULTS, help="where the table goes (default bench/results/divpo_nouns.md)")
    args = parser.parse_args()
    if args.seeds < 1 or args.workers < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--steps, --seeds and --workers must be positive")
    labels = list(METHODS) if not args.methods else [label.strip() for label in args.methods.split(";")]
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        parser.error(f"unknown method {'; '.join(unknown)}: choose from {'; '.join(METHODS)} (separated by ';')")

    from pref.plugins.default_model import default_model_path

    loads = [load_average()]
    start = time.perf_counter()
    default_model_path()  # built once, before the runs start side by side
    settings = shared_settings(args.steps, labels)
    jobs = [(label, seed) for seed in range(args.seeds) for label in labels]
    results: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="divpo-nouns-") as work_dir, ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        untrained = pool.submit(evaluate_untrained)
        futures = {pool.submit(train_and_evaluate, label, METHODS[label], args.steps, seed, work_dir): (label, seed) for label, seed in jobs}
        for future in as_completed(futures):
            label, seed = futures[future]
            result = future.result()
            results[label].append(result)
            print(f"{label}, seed {seed}: {result['steps_run']} steps in {result['train_s']:.0f} s; valid rate {result['valid_rate']:.3f}, "
                  f"{result['unique_valid']:.0f} unique valid nouns, DAT-style score {result['dat_score']:.1f}", file=sys.stderr, flush=True)
        base = untrained.result()
    results = {label: sorted(runs, key=lambda r: r["seed"]) for label, runs in results.items()}
    loads.append(load_average())
    text = report(results, base, settings, args.seeds, args.workers, (time.perf_counter() - start) / 60, tuple(loads))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
