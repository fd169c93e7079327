"""Memory and time of one forward + backward of gold's ULD loss: pref's chunks against TRL 1.16's `ULDLoss` on full logits.

    python bench/gold_loss.py [--rows 8] [--repeats 1] [--vocabs 16384,65536]

The loss alone, from the two models' last hidden states through their output layers: a student of Qwen2.5-0.5B's width
(896) learning from a teacher of 1.5B's (1536) that has another tokenizer. The answers are English text of uneven lengths
(24 to 320 of the student's tokens), written by the student's byte-level BPE tokenizer of 16k tokens and the teacher's of
8k (trained here on wordfreq's words, so the two split many words differently), grouped by bytes (TRL's default
`use_extended_uld`, the "observed" merge). Both output layers have `--vocabs` rows (beyond the tokenizers' tokens, rows no
answer uses, as a real model's vocabulary has): the cost of ULD's softmax and sort over the whole vocabulary.

- `TRL ULDLoss`: TRL 1.16's `trl.experimental.gold.gold_trainer.ULDLoss` on both models' [B, T, V] logits (what its
  GOLDTrainer hands it);
- `pref chunked`: `pref.plugins.gold.Gold.aligned_losses`, a few groups at a time, each chunk recomputed in the backward.

Each measurement runs in its own process on the CPU (2 threads): the peak RSS growth over the process's RSS before the first
pass, and the median time of `--repeats` forward + backward passes. Prints a markdown table and writes bench/results/gold_loss.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import types

from machine import machine  # bench/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
STUDENT, TEACHER = 896, 1536
TOKENIZERS = {"student": 16_384, "teacher": 8_192}
NAMES = {"trl": "TRL ULDLoss", "pref": "pref chunked"}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def answers(tokenizer, rows: int) -> list[str]:
    """`rows` texts of Zipf-drawn words, each as long as a target of 24-320 of `tokenizer`'s tokens."""
    from dpo_throughput import corpus_words

    words, rng = corpus_words(), random.Random(0)
    weights = [1 / (rank + 10) for rank in range(len(words))]
    texts = []
    for _ in range(rows):
        target, text = rng.randint(24, 320), ""
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text += " " + " ".join(rng.choices(words, weights, k=8))
        texts.append(text)
    return texts


def child(folder: str, vocab: int, mode: str, rows: int, repeats: int) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast

    from pref.plugins.gold import Gold, byte_spans, piece_bytes, text_tokens
    from pref.sequences import OutputHead

    torch.set_num_threads(2)
    torch.manual_seed(0)
    student_tok, teacher_tok = (PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, side)) for side in ("student", "teacher"))
    texts, prompt = answers(student_tok, rows), 16  # each row: 16 prompt tokens, the answer, the end token
    ours, theirs = [], []
    for text in texts:
        ids = student_tok(text, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
        ours.append((ids, byte_spans(piece_bytes(student_tok, ids)), prompt))
        ids, spans = text_tokens(teacher_tok, text)
        theirs.append((ids + [teacher_tok.eos_token_id], spans + [(len(text.encode()),) * 2], prompt))
    width_s, width_t = (prompt + max(len(ids) for ids, _, _ in side) for side in (ours, theirs))
    objective = Gold(reference_model="teacher")
    alignment = objective.align(ours, theirs, width_s, width_t)
    student_head = torch.nn.Linear(STUDENT, vocab, bias=False)
    teacher_head = torch.nn.Linear(TEACHER, vocab, bias=False).requires_grad_(False)
    hidden_s = torch.randn(rows, width_s, STUDENT, requires_grad=True)
    hidden_t = torch.randn(rows, width_t, TEACHER)

    def trl_inputs(side, width, tokenizer):
        ids = torch.full((rows, width), tokenizer.pad_token_id)
        labels = torch.full((rows, width), -100)
        offsets = torch.zeros(rows, width, 2, dtype=torch.long)
        for row, (answer, spans, start) in enumerate(side):
            ids[row, start : start + len(answer)] = labels[row, start : start + len(answer)] = torch.tensor(answer)
            offsets[row, start : start + len(answer)] = torch.tensor(spans)
        return ids, labels, offsets

    if mode == "trl":
        from trl.experimental.gold.gold_trainer import ULDLoss

        config = types.SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                                       uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
                                       use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False, beta=0.5)
        uld = ULDLoss(config, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
        (s_ids, s_labels, s_offsets), (t_ids, t_labels, t_offsets) = trl_inputs(ours, width_s, student_tok), trl_inputs(theirs, width_t, teacher_tok)
    before = rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if mode == "pref":
            figures = objective.aligned_losses(hidden_s.reshape(-1, STUDENT), OutputHead(student_head), hidden_t.reshape(-1, TEACHER),
                                               OutputHead(teacher_head), alignment)
            row = torch.tensor(alignment.row)
            groups = torch.zeros(rows).index_add(0, row, torch.ones(len(row)))
            loss = (torch.zeros(rows).index_add(0, row, figures[0]) / groups.clamp_min(1)).mean()
        else:
            with torch.no_grad():
                teacher_logits = teacher_head(hidden_t)
            loss = uld(student_head(hidden_s), teacher_logits, s_labels, t_labels, s_ids, t_ids, s_offsets, t_offsets)
        loss.backward()
        hidden_s.grad = None
        student_head.zero_grad(set_to_none=True)
        value = loss.item()
        del loss
        times.append(time.perf_counter() - start)
    return {"peak_growth_mib": rss_mib() - before, "median_s": sorted(times)[len(times) // 2], "groups": len(alignment.row),
            "student_tokens": sum(len(ids) for ids, _, _ in ours), "teacher_tokens": sum(len(ids) for ids, _, _ in theirs), "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--vocabs", default="16384,65536")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.rows, args.repeats)))
        return
    from dpo_throughput import build_bpe_tokenizer

    folder = tempfile.mkdtemp(prefix="pref-gold-bench-")
    for side, size in TOKENIZERS.items():
        build_bpe_tokenizer(size).save_pretrained(os.path.join(folder, side))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TRL_EXPERIMENTAL_SILENCE": "1"}
    vocabs = [int(v) for v in args.vocabs.split(",")]
    table = []
    for vocab in vocabs:
        results = {}
        for mode in ("trl", "pref"):
            done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--repeats", str(args.repeats), "--child", folder,
                                   str(vocab), mode], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {vocab} {mode}: {results[mode]}", file=sys.stderr, flush=True)
        peer = results["trl"]
        for mode, figures in results.items():
            against = "" if mode == "trl" else (f"x{figures['peak_growth_mib'] / max(peer['peak_growth_mib'], 1):.2f} memory, "
                                                f"x{figures['median_s'] / peer['median_s']:.2f} time")
            table.append(f"| {vocab:,} | {figures['groups']:,} | {NAMES[mode]} | {figures['loss']:.4f} | {figures['peak_growth_mib']:,.0f} | "
                         f"{figures['median_s']:.2f} | {against} |")
    first = results["pref"]
    lines = [
        "# gold's ULD loss: one forward + backward from the hidden states", "",
        f"Machine: {machine()}, CPU, 2 threads. Student width {STUDENT} (a 16k byte-level BPE tokenizer), teacher width {TEACHER} (an 8k "
        f"one), fp32, random weights; {args.rows} answers, {first['student_tokens']:,} student and {first['teacher_tokens']:,} teacher "
        f"tokens, grouped by bytes; median of {args.repeats} passes, each way in its own process.", "",
        "| output rows | groups | way | loss | peak memory growth (MiB) | s per forward + backward | against TRL |",
        "|---:|---:|---|---:|---:|---:|---:|",
        *table, "",
        f"Command: `python bench/gold_loss.py --rows {args.rows} --repeats {args.repeats} --vocabs {args.vocabs}`", "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "gold_loss.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
