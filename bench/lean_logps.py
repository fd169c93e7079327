"""Memory and time of one forward + backward through the log-probs: lean path against full logits.

    python bench/lean_logps.py [--rows 8] [--tokens 320] [--repeats 3]
    python bench/lean_logps.py --packing [--rows 8] [--batches 4] [--repeats 5]
    python bench/lean_logps.py --entropy [--rows 8] [--tokens 320] [--repeats 3]

The lean path (pref's default, `pref.sequences.model_logps`) runs the LM head only at
completion positions, a chunk at a time, recomputing each chunk in the backward pass; the
full path (`with_logits=True`, what objectives that need whole distributions get) computes
the model's [rows, tokens, vocabulary] logits. Same Llama body as the realistic shape of
bench/dpo_throughput.py (hidden 512, 6 layers), random weights, vocabularies of 16k, 64k and
151k; rows of `--tokens` tokens whose last three quarters are the completion. Each
measurement runs in its own process on the CPU (2 threads): the peak RSS growth over the
process's RSS before the first forward, and the median time of `--repeats` forward + backward
passes. Prints a markdown table and writes bench/results/lean_logps.md.

`--packing` compares, in one process, the lean path on padded rows against the same rows
packed without padding (`model_logps(..., packing=True)`, `pref.packing`): vocabulary 16k,
`--batches` batches of `--rows` rows (pairs of a shared prompt of 16-48 words and answers of
16-256 words, at 1.3 tokens per word, as bench/dpo_throughput.py's realistic shape), one
forward + backward per batch, padded and packed interleaved (which goes first alternates),
the median over `--repeats` rounds of the time of all batches. The machine's load average is
printed with it: on a shared machine only the ratio means much. Writes
bench/results/packing.md.

`--entropy` measures the log-probs together with each completion token's entropy (what GRPO's
`top_entropy_quantile` reads), as the first mode does, for pref's lean path asked for the entropies
(`with_entropy=True`), the same path without them, and TRL 1.16's own fused LM head
(`trl.trainer.utils.add_fused_lm_head` with outputs log_probs and entropy, what its GRPOTrainer
calls with `fused_lm_head=True`; on a CPU it projects every position, masking the prompt's
afterwards, since its compact path needs Triton). Writes bench/results/entropy.md.
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
    if mode == "trl-fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        labels = ids.masked_fill(completion == 0, -100)
    before = rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if mode == "trl-fused":
            out = model(input_ids=ids, attention_mask=sequences.attention_mask, labels=labels, fused_lm_head=True)
            assert out.entropy is not None
            out.log_probs.sum().backward()
        else:
            out = model_logps(model, sequences, with_logits=mode == "full", with_entropy=mode == "lean-entropy")
            assert (out.entropy is not None) == (mode == "lean-entropy")
            out.sequence.sum().backward()
        model.zero_grad(set_to_none=True)
        del out
        times.append(time.perf_counter() - start)
    return {"peak_growth_mib": rss_mib() - before, "median_s": sorted(times)[len(times) // 2]}


def uneven_batches(rows: int, batches: int, vocab: int, seed: int = 0) -> list:
    """`batches` right-padded `Sequences` of `rows` rows: pairs of answers to one prompt, lengths as the realistic shape."""
    import random

    import torch

    from pref.sequences import Sequences

    rng = random.Random(seed)
    tokens = lambda low, high: round(1.3 * rng.randint(low, high))  # noqa: E731 - words to BPE tokens
    out = []
    for _ in range(batches):
        rows_ = []
        for _ in range(rows // 2):
            prompt = tokens(16, 48)
            rows_ += [(prompt, tokens(16, 256) + 1), (prompt, tokens(16, 256) + 1)]  # + EOS
        width = max(p + a for p, a in rows_)
        ids = torch.zeros(len(rows_), width, dtype=torch.long)
        attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (p, a) in enumerate(rows_):
            ids[i, : p + a] = torch.randint(1, vocab, (p + a,))
            attention[i, : p + a] = 1
            completion[i, p : p + a] = 1
        out.append(Sequences(ids, attention, completion))
    return out


def packing_comparison(args: argparse.Namespace) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pref import packing
    from pref.sequences import model_logps

    vocab = VOCABS[0]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **BODY)).train()
    batches = uneven_batches(args.rows, args.batches, vocab)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    padded_positions = sum(b.input_ids.numel() for b in batches)
    packed_positions = 0
    for b in batches:
        lengths = b.attention_mask.sum(-1).tolist()
        packed_positions += len(packing.packing_plan(lengths, max(lengths))) * max(lengths)
    assert packing.packs_correctly(model)

    def step(sequences, packed: bool) -> float:
        start = time.perf_counter()
        out = model_logps(model, sequences, packing=packed)
        out.sequence.sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for b in batches:  # warm-up
        step(b, False), step(b, True)
    times = {False: [], True: []}
    for repeat in range(args.repeats):
        total = {False: 0.0, True: 0.0}
        for i, b in enumerate(batches):
            for packed in ((False, True) if (repeat + i) % 2 == 0 else (True, False)):
                total[packed] += step(b, packed)
        for packed in total:
            times[packed].append(total[packed])
        print(f"  round {repeat + 1}: padded {total[False]:.2f} s, packed {total[True]:.2f} s", file=sys.stderr, flush=True)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    load = os.getloadavg()
    lines = [
        "# Packed against padded rows: one forward + backward of the lean log-probs", "",
        f"Machine: {machine()}, CPU, 2 threads, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) "
        f"at the end: measured under load, so the ratio is the figure. Llama body hidden {BODY['hidden_size']}, "
        f"{BODY['num_hidden_layers']} layers, vocabulary {vocab:,}, fp32, random weights. {args.batches} batches of {args.rows} "
        f"rows (pairs of answers of 16-256 words to a prompt of 16-48 words, 1.3 tokens per word); median of {args.repeats} rounds "
        "of all batches, padded and packed interleaved.", "",
        "| rows | real tokens | positions through the model | s per round | packed / padded time |",
        "|---|---:|---:|---:|---:|",
        f"| padded | {real:,} | {padded_positions:,} | {median[False]:.2f} | |",
        f"| packed | {real:,} | {packed_positions:,} | {median[True]:.2f} | x{median[True] / median[False]:.2f} |",
        "", f"Command: `python bench/lean_logps.py --packing --rows {args.rows} --batches {args.batches} --repeats {args.repeats}`", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--packing", action="store_true", help="packed against padded rows instead (vocabulary 16k)")
    parser.add_argument("--batches", type=int, default=4, help="with --packing: batches of uneven rows")
    parser.add_argument("--entropy", action="store_true", help="log-probs with entropies: pref's lean path against TRL's fused head")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.packing:
        text = packing_comparison(args)
        print(text)
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "packing.md"), "w") as f:
            f.write(text)
        return
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.rows, args.tokens, args.repeats)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    # (peer, ours): the peer's mode first; each row compares them
    modes, title, result, flag = (("full", "lean"), "Lean log-probs against full logits", "lean_logps.md", "")
    if args.entropy:
        modes, title, result, flag = (("trl-fused", "lean-entropy", "lean"), "Log-probs with entropies: pref's lean path "
                                      "against TRL 1.16's fused LM head", "entropy.md", " --entropy")
    names = {"full": "full logits", "lean": "lean", "trl-fused": "TRL fused head + entropy", "lean-entropy": "lean + entropy"}
    peer = modes[0]
    lines = [
        f"# {title}: one forward + backward", "",
        f"Machine: {machine()}, CPU, 2 threads, load average {os.getloadavg()[0]:.2f} at the start. {args.rows} rows of "
        f"{args.tokens} tokens (the last three quarters the completion), Llama body hidden {BODY['hidden_size']}, "
        f"{BODY['num_hidden_layers']} layers, fp32. Peak RSS growth over the RSS before the first pass; median of "
        f"{args.repeats} passes.", "",
        "| vocabulary | " + " | ".join(f"{names[m]}: peak growth MiB" for m in modes) + " | "
        + " | ".join(f"{names[m]}: s" for m in modes) + " | " + " | ".join(f"{names[m]} / {names[peer]}: memory, time" for m in modes[1:]) + " |",
        "|" + "---:|" * (1 + 2 * len(modes) + len(modes) - 1),
    ]
    for vocab in VOCABS:
        r = {}
        for mode in modes:
            command = [sys.executable, os.path.abspath(__file__), "--child", str(vocab), mode, "--rows", str(args.rows),
                       "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            r[mode] = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            print(f"  vocab {vocab} {mode}: {r[mode]}", file=sys.stderr, flush=True)
        ratios = [f"x{r[m]['peak_growth_mib'] / r[peer]['peak_growth_mib']:.2f}, x{r[m]['median_s'] / r[peer]['median_s']:.2f}" for m in modes[1:]]
        lines.append(f"| {vocab:,} | " + " | ".join(f"{r[m]['peak_growth_mib']:.0f}" for m in modes) + " | "
                     + " | ".join(f"{r[m]['median_s']:.2f}" for m in modes) + " | " + " | ".join(ratios) + " |")
    lines += ["", f"Command: `python bench/lean_logps.py{flag} --rows {args.rows} --tokens {args.tokens} --repeats {args.repeats}`", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", result), "w") as f:
        f.write(text)

if __name__ == "__main__":
    main()
