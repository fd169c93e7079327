"""Memory and time of LoRA on a bf16 base against LoRA on a 4-bit base (`--quantize nf4`, QLoRA), at Qwen2.5-0.5B's shape.

    python bench/quantized_lora.py [--rows 2] [--tokens 128] [--repeats 3]

A Qwen2 model with Qwen2.5-0.5B's configuration (vocabulary 151,936, hidden 896, 24 layers,
14 heads and 2 key-value heads, tied embeddings; 494M parameters) and random weights is saved
once in bf16. Each mode then runs in its own process on the CPU (2 threads): pref's
`load_model` (bf16, or with `quantize="nf4"`: the decoder's linear layers in 4 bits, computing
in bf16), pref's `lora` adapter (r 16 on every linear layer, its default), and `--repeats`
forward + backward passes through the lean log-probs (`pref.sequences.model_logps`) on
`--rows` rows of `--tokens` random tokens whose last three quarters are the completion, as a
DPO step's policy pass. Reported: the weights' memory (transformers' `get_memory_footprint`)
and the median pass. A process's RSS on the CPU says little here (a bf16 model's weights stay
mapped from the file and count only once touched; loading in 4 bits leaves the bf16 pages it
read mapped): the memory a run needs on a GPU is measured by bench/gpu_check.py
(`pref-dpo-qlora` against `pref-dpo`). Prints a markdown table and writes
bench/results/quantized_lora.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from machine import machine  # bench/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32_768)
MODES = {"LoRA, bf16 base": None, "LoRA, nf4 base (--quantize nf4)": "nf4"}


def build(path: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def child(path: str, quantize: str | None, rows: int, tokens: int, repeats: int) -> dict:
    import torch

    from pref.models import load_model
    from pref.plugins.lora import Lora
    from pref.sequences import Sequences, model_logps

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_model(path, torch.bfloat16, quantize=quantize, device="cpu")
    footprint = model.get_memory_footprint() / 2**20
    model = Lora().wrap(model, "causal-lm").train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained weights in float32, as pref keeps them (pref.precision)
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, tokens))
    completion = torch.zeros_like(ids)
    completion[:, tokens // 4 :] = 1
    sequences = Sequences(ids, torch.ones_like(ids), completion)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model_logps(model, sequences)
        out.sequence.sum().backward()
        model.zero_grad(set_to_none=True)
        del out
        times.append(time.perf_counter() - start)
    return {"weights_mib": footprint, "median_s": sorted(times)[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, quantize = args.child
        print(json.dumps(child(path, quantize or None, args.rows, args.tokens, args.repeats)))
        return

    with tempfile.TemporaryDirectory() as folder:
        parameters = build(folder)
        results = {}
        for label, quantize in MODES.items():
            command = [sys.executable, __file__, "--rows", str(args.rows), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                       "--child", folder, quantize or ""]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode:
                sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [
        f"Qwen2.5-0.5B's shape ({parameters / 1e6:.0f}M parameters, random weights), {args.rows} rows x {args.tokens} tokens, "
        f"median of {args.repeats} forward + backward passes; {machine()}; load average {os.getloadavg()[0]:.1f}.",
        "",
        "| run | weights MiB | s per forward + backward |",
        "|---|---:|---:|",
        *(f"| {label} | {r['weights_mib']:.0f} | {r['median_s']:.2f} |" for label, r in results.items()),
    ]
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "quantized_lora.md"), "w") as f:
        f.write(f"`python bench/quantized_lora.py --rows {args.rows} --tokens {args.tokens} --repeats {args.repeats}`\n\n{table}\n")


if __name__ == "__main__":
    main()
