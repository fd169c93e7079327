"""Memory and time of one forward + backward of distill's loss: pref's chunks against TRL 1.16's kernel and full logits.

    python bench/distill_loss.py [--rows 8] [--repeats 3]

The loss alone, from the two models' last hidden states through their output layers: a student of
Qwen2.5-0.5B's width (896) learning from a teacher of 1.5B's (1536), `beta` 0.5 (the JSD, the
costliest case for TRL's kernel, which then makes a second pass over the vocabulary), on `--rows`
sampled answers of uneven lengths (24 to 320 tokens, 1,2xx completion positions at 8 rows), at
vocabularies of 16k, 64k and 151k (Qwen's). Three ways:

- `full logits`: both [N, V] logits at once, then the divergence (what TRL's experimental GKDTrainer's
  `generalized_jsd_loss` does from the models' logits);
- `TRL chunked`: TRL 1.16's DistillationTrainer loss, `_chunked_divergence_loss` (its CPU tile path: the
  Triton kernel needs a GPU), tiles of the vocabulary, all positions at once;
- `pref chunked`: `pref.plugins.distill.chunked_divergence`, a few positions at a time over the whole
  vocabulary, each chunk recomputed in the backward.

Each measurement runs in its own process on the CPU (2 threads): the peak RSS growth over the process's RSS
before the first step, and the median time of `--repeats` forward + backward passes. Prints a markdown table
and writes bench/results/distill_loss.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from machine import machine  # bench/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
VOCABS = (16_384, 65_536, 151_936)
STUDENT, TEACHER, BETA = 896, 1536, 0.5
NAMES = {"full": "full logits", "trl": "TRL chunked", "pref": "pref chunked"}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lengths(rows: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randint(24, 320) for _ in range(rows)]


def child(vocab: int, mode: str, rows: int, repeats: int) -> dict:
    import torch

    from pref.plugins.distill import chunked_divergence, generalized_jsd
    from pref.sequences import OutputHead

    torch.set_num_threads(2)
    torch.manual_seed(0)
    answer = lengths(rows)
    mask = torch.zeros(rows, max(answer), dtype=torch.long)
    for i, n in enumerate(answer):
        mask[i, :n] = 1
    student_head = torch.nn.Linear(STUDENT, vocab, bias=False)
    teacher_head = torch.nn.Linear(TEACHER, vocab, bias=False).requires_grad_(False)
    hidden_s = torch.randn(rows, mask.shape[1], STUDENT, requires_grad=True)
    hidden_t = torch.randn(rows, mask.shape[1], TEACHER)
    where = mask.bool()
    before = rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if mode == "pref":
            divergence, _ = chunked_divergence(hidden_s[where], OutputHead(student_head), hidden_t[where], OutputHead(teacher_head), BETA)
            loss = divergence.sum() / where.sum()
        elif mode == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            loss = _chunked_divergence_loss(hidden_s, hidden_t, student_head.weight, teacher_head.weight, mask, BETA)[0]
        else:
            student, teacher = student_head(hidden_s[where]), teacher_head(hidden_t[where])
            loss = generalized_jsd(student, teacher, BETA).mean()
        loss.backward()
        hidden_s.grad = None
        student_head.zero_grad(set_to_none=True)
        del loss
        times.append(time.perf_counter() - start)
    return {"peak_growth_mib": rss_mib() - before, "median_s": sorted(times)[len(times) // 2], "positions": int(where.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.rows, args.repeats)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    lines = [
        "# distill's loss: one forward + backward from the hidden states", "",
        f"Machine: {machine()}, CPU, 2 threads. Student width {STUDENT}, teacher width {TEACHER}, beta {BETA} (the JSD), fp32, "
        f"random weights; {args.rows} answers of 24-320 tokens; median of {args.repeats} passes, each way in its own process.", "",
        "| vocabulary | positions | way | peak memory growth (MiB) | s per forward + backward | against TRL chunked |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for vocab in VOCABS:
        results = {}
        for mode in ("full", "trl", "pref"):
            done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--repeats", str(args.repeats), "--child", str(vocab), mode],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {vocab} {mode}: {results[mode]}", file=sys.stderr, flush=True)
        peer = results["trl"]
        for mode, figures in results.items():
            against = "" if mode == "trl" else (f"x{figures['peak_growth_mib'] / max(peer['peak_growth_mib'], 1):.2f} memory, "
                                                f"x{figures['median_s'] / peer['median_s']:.2f} time")
            lines.append(f"| {vocab:,} | {figures['positions']:,} | {NAMES[mode]} | {figures['peak_growth_mib']:,.0f} | "
                         f"{figures['median_s']:.2f} | {against} |")
    lines += ["", f"Command: `python bench/distill_loss.py --rows {args.rows} --repeats {args.repeats}`", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "distill_loss.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
