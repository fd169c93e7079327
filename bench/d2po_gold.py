"""D2PO against its baselines: gold reward of the policy's samples versus gold labels spent.

    python bench/d2po_gold.py [--steps N] [--batch-size B] [--seeds 0 1] [--round-size N] [--budget B]

On the embedded default model (no --model) with the `bag-of-words` gold reward and its
default prompts ("Write a sentence about a river."), four configurations of the same
plugins train with the same steps, learning rate, batch size (prompts per step), K = 2
and seed:

- D2PO, confidence: `--objective d2po`, relabeling the least confident pairs;
- D2PO, random: the same with `selection=random`;
- frozen discriminator: D2PO with `budget=0` (a static reward model);
- gold on every pair: `--objective online-dpo --reward bag-of-words -k 2`.

The three discriminator runs start from the same reward model, trained here with the
`reward-model` objective on gold-labelled pairs of the starting policy's samples; those
labels count towards what each of them spent. Gold on every pair spends one label per
pair it trains on (ties included, as D2PO's ties are).

The gold reward of the policy's samples is D2PO's `eval/gold_reward` (evaluation only,
not spent) and online DPO's `reward/mean`: both the mean gold reward of the step's
samples. The table gives its mean over a window of steps and the labels spent by then.
Every run uses one torch thread: on 2 shared cores, 2 threads ran online DPO ~30 times
slower when other jobs kept the cores busy. Results go to stdout and
bench/results/d2po_gold.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

from pref.config import build_config
from pref.interfaces import SamplingConfig
from pref.plugins.gold_rewards import BagOfWords
from pref.policy import HFPolicy
from pref.registry import load_registry
from pref.train import train

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "d2po_gold.md")


def initial_pairs(path: str, draws: int, seed: int, max_new_tokens: int) -> int:
    """Gold-label pairs of the starting policy's samples into a JSONL file; return the labels spent."""
    torch.manual_seed(seed)
    policy = HFPolicy.load(None)
    gold = BagOfWords()
    prompts = list(BagOfWords.default_prompts) * draws
    completions = policy.generate(prompts, 2, SamplingConfig(max_new_tokens=max_new_tokens))
    scores = gold.score([p for p in prompts for _ in range(2)], [c for row in completions for c in row])["reward"].view(-1, 2)
    spent = 0
    with open(path, "w") as f:
        for prompt, (a, b), (score_a, score_b) in zip(prompts, completions, scores.tolist()):
            if a.strip() == b.strip():
                continue  # nothing to ask the gold reward about
            spent += 1
            if score_a != score_b:
                chosen, rejected = (a, b) if score_a > score_b else (b, a)
                f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return spent


def run(name: str, out_dir: str, flags: dict, registry) -> list[dict]:
    start = time.perf_counter()
    config = build_config(flags={**flags, "output_dir": os.path.join(out_dir, name)})
    path = train(config, registry)
    lines = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return lines


def curve(lines: list[dict], labels_at_start: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Per step: the gold reward of the step's samples and the gold labels spent by its end."""
    gold, spent = [], []
    total = labels_at_start
    for m in lines:
        if "eval/gold_reward" in m:
            gold.append(m["eval/gold_reward"])
            spent.append(labels_at_start + m["gold/labels_spent"])
        else:  # online DPO: the gold reward is the reward; every draw labels one pair per prompt
            gold.append(m["reward/mean"])
            total += batch_size * (1 + m["samples/redraws"])
            spent.append(total)
    return gold, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--round-size", type=int, default=32)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--initial-draws", type=int, default=4, help="starting-policy pairs per default prompt for the initial reward model")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    registry = load_registry()
    work = tempfile.mkdtemp(prefix="d2po-bench-")
    common = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "device": "cpu", "max_new_tokens": args.max_new_tokens,
              "samples_per_prompt": 2, "loggers": ["jsonl"]}
    results: dict[str, list[tuple[list[float], list[float]]]] = {}
    initial_labels = []
    try:
        for seed in args.seeds:
            print(f"seed {seed}", file=sys.stderr)
            pairs_file = os.path.join(work, f"initial-{seed}.jsonl")
            spent = initial_pairs(pairs_file, args.initial_draws, seed, args.max_new_tokens)
            initial_labels.append(spent)
            run(f"reward-model-{seed}", work, {**common, "objective": "reward-model", "dataset": [pairs_file], "seed": seed,
                                               "steps": 40, "samples_per_prompt": None}, registry)
            start_rm = os.path.join(work, f"reward-model-{seed}", "final")
            # the discriminator keeps training on the pairs it started from (`gold_pairs`), as on all gold labels so far
            d2po = {"discriminator": start_rm, "gold_pairs": pairs_file, "round_size": args.round_size, "budget": args.budget}
            configs = {
                "D2PO, confidence": ({"objective": "d2po", "objective_options": d2po}, spent),
                "D2PO, random": ({"objective": "d2po", "objective_options": {**d2po, "selection": "random"}}, spent),
                "frozen discriminator (budget=0)": ({"objective": "d2po", "objective_options": {**d2po, "budget": 0}}, spent),
                "gold on every pair (online DPO)": ({"objective": "online-dpo", "reward": "bag-of-words"}, 0),
            }
            for index, (name, (flags, labels_at_start)) in enumerate(configs.items()):
                lines = run(f"run-{index}-{seed}", work, {**common, **flags, "seed": seed}, registry)
                results.setdefault(name, []).append(curve(lines, labels_at_start, args.batch_size))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - began) / 60

    checkpoints = sorted({1, *range(args.window, args.steps + 1, args.window)})
    header = "| configuration | " + " | ".join(f"step {s}" if s == 1 else f"steps {max(1, s - args.window + 1)}-{s}" for s in checkpoints) + " |"
    rows = [header, "|---|" + "---:|" * len(checkpoints)]
    for name, runs in results.items():
        cells = []
        for s in checkpoints:
            lo = 0 if s == 1 else s - args.window
            gold = statistics.mean(statistics.mean(g[lo:s]) for g, _ in runs)
            spent = statistics.mean(sp[s - 1] for _, sp in runs)
            cells.append(f"{gold:.2f} ({spent:.0f})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    command = (f"python bench/d2po_gold.py --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --seeds {' '.join(map(str, args.seeds))} "
               f"--round-size {args.round_size} --budget {args.budget} --initial-draws {args.initial_draws} --window {args.window} "
               f"--max-new-tokens {args.max_new_tokens}")
    report = f"""# D2PO: gold reward of policy samples versus gold labels spent

Each cell: mean `bag-of-words` gold reward of the policy's samples over the steps named
(step 1: the starting policy), averaged over seeds {', '.join(map(str, args.seeds))}, and in brackets the gold
labels spent by the end of those steps. The default word list has 18 words; an answer
like "the river is quiet and i like it." scores 2.

{table}

Setup: the embedded default model; {args.steps} steps of {args.batch_size} prompts x 2 samples, lr {args.lr}, beta 0.1,
{args.max_new_tokens} new tokens at temperature 1. D2PO relabels {args.budget} pairs every {args.round_size} samples
(every {args.round_size // (2 * args.batch_size) or 1} steps) and updates its discriminator for 4 epochs at lr 1e-4 on all gold pairs so far.
The three discriminator runs start from one reward model (`--objective reward-model`, 40 steps) trained on
the gold-labelled pairs of {args.initial_draws} draws of 2 samples per default prompt (about
{statistics.mean(initial_labels):.0f} labels, counted in their totals; tied pairs were spent but not used); D2PO's
discriminator updates keep training on those pairs too (`-o gold_pairs=FILE`).
Gold on every pair spends a label on every pair it trains on and counts from 0.

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average
{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}, torch {torch.__version__},
one torch thread. The whole benchmark took {minutes:.1f} min.

Command: `{command}`
"""
    print(report)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(report)


if __name__ == "__main__":
    main()
