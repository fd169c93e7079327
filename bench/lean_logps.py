"""Memory and time of one forward + backward through the log-probs: lean path against full logits.

    python bench/lean_logps.py [--rows 8] [--tokens 320] [--repeats 3]

The lean path (pref's default, `pref.sequences.model_logps`) runs the LM head only at
completion positions, a chunk at a time, recomputing each chunk in the backward pass; the
full path (`with_logits=True`, what objectives that need whole distributions get) computes
the model's [rows, tokens, vocabulary] logits. Same Llama body as the realistic shape of
bench/dpo_throughput.py (hidden 512, 6 layers), random weights, vocabularies of 16k, 64k and
151k; rows of `--tokens` tokens whose last three quarters are the completion. Each
measurement runs in its own process on the CPU (2 threads): the peak RSS growth over the
process's RSS before the first forward, and the median time of `--repeats` forward + backward
passes. Prints a markdown table and writes bench/results/lean_logps.md.
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
BODY = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(vocab: int, mode: str, rows: int, tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pref.sequences import Sequences, model_logps

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **BODY)).train()
    ids = torch.randint(0, vocab, (rows, tokens))
    completion = torch.zeros_like(ids)
    completion[:, tokens // 4 :] = 1
    sequences = Sequences(ids, torch.ones_like(ids), completion)
    before = rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model_logps(model, sequences, with_logits=mode == "full")
        out.sequence.sum().backward()
        model.zero_grad(set_to_none=True)
        del out
        times.append(time.perf_counter() - start)
    return {"peak_growth_mib": rss_mib() - before, "median_s": sorted(times)[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.rows, args.tokens, args.repeats)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    lines = [
        "# Lean log-probs against full logits: one forward + backward", "",
        f"Machine: {machine()}, CPU, 2 threads. {args.rows} rows of {args.tokens} tokens (the last three quarters the "
        f"completion), Llama body hidden {BODY['hidden_size']}, {BODY['num_hidden_layers']} layers, fp32. Peak RSS growth "
        f"over the RSS before the first pass; median of {args.repeats} passes.", "",
        "| vocabulary | full logits: peak growth MiB | lean: peak growth MiB | lean / full memory | full logits: s | lean: s | lean / full time |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for vocab in VOCABS:
        r = {}
        for mode in ("full", "lean"):
            command = [sys.executable, os.path.abspath(__file__), "--child", str(vocab), mode, "--rows", str(args.rows),
                       "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            r[mode] = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            print(f"  vocab {vocab} {mode}: {r[mode]}", file=sys.stderr, flush=True)
        full, lean = r["full"], r["lean"]
        lines.append(f"| {vocab:,} | {full['peak_growth_mib']:.0f} | {lean['peak_growth_mib']:.0f} | x{lean['peak_growth_mib'] / full['peak_growth_mib']:.2f} | "
                     f"{full['median_s']:.2f} | {lean['median_s']:.2f} | x{lean['median_s'] / full['median_s']:.2f} |")
    lines += ["", f"Command: `python bench/lean_logps.py --rows {args.rows} --tokens {args.tokens} --repeats {args.repeats}`", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "lean_logps.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
