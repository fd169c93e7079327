"""SDFT training throughput and memory of pref against TRL 1.16's experimental `SDFTTrainer`, at a realistic shape, on this machine.

    python bench/sdft_throughput.py [--steps 6] [--warmup 2] [--prompts 4] [-k 2] [--new-tokens 64] [--vocab 0]

Both trainers get the model of `grpo_throughput.py` (a Llama of about 36M parameters, hidden 512, 6 layers, untied head, over a
byte-level BPE tokenizer of 16,384 tokens trained here; `--vocab` widens its embeddings and output layer, the tokenizer
unchanged), random weights, fp32 on the CPU with 2 torch threads. Each of the 256 synthetic rows gives a prompt (16-48 words)
and its demonstration, the `privileged_context` (the pair's chosen answer). Each optimizer step samples K answers to each of
`--prompts` prompts (`--new-tokens` at most: a model of random weights almost never ends one earlier) and takes one gradient
step on all of them against the teacher, the starting model reading "{prompt}\\n\\n{privileged_context}" then the same answer.
The settings are TRL's SDFT defaults, which pref's `sdft` shares: top-100 logit distillation, alpha 0.5, the `base` teacher,
one pass per rollout; prompts cut at 256 tokens on both sides; lr 1e-6, AdamW, gradient clipping at 1.0, seed 0. Neither uses
gradient checkpointing or vLLM; both sample through transformers' `generate`.

The trainers take turns step by step (`dpo_throughput.run_children`). Seconds per step run from the end of one optimizer step
to the end of the next: sampling, the teacher's forward and the update. Also: completion tokens sampled per step, process CPU
time per step, peak RSS. The table goes to stdout and bench/results/sdft_throughput.md (or sdft_throughput_VOCAB.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import dpo_throughput as dpo  # bench/ is on sys.path when a script runs
import grpo_throughput as grpo

LR, MAX_PROMPT_LENGTH = 1e-6, 256
RUNS = {"pref": "pref `sdft` (its defaults)", "trl": "TRL SDFTTrainer (its defaults, no vLLM)"}


def results_path(vocab: int) -> str:
    return os.path.join(dpo.HERE, "results", f"sdft_throughput{f'_{vocab}' if vocab else ''}.md")


def run_pref(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    return grpo.run_pref_online(args, clock, {"objective": "sdft", "dataset": [os.path.join(args.work_dir, "demos.jsonl")],
                                              "max_prompt_length": MAX_PROMPT_LENGTH, "lr": LR})


def run_trl(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    import torch
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(dpo.THREADS)
    dpo.preload_model_code()
    after_imports = dpo.rss_mib()

    class CountedSDFTTrainer(SDFTTrainer):
        def sample_rollouts(self, *a, **k):
            out = super().sample_rollouts(*a, **k)
            clock.tokens.append(int(out["completion_mask"].sum()))
            return out

    entry = clock.turn.now()
    model, tokenizer, dataset = grpo.trl_inputs(args, "demos.jsonl")
    config = SDFTConfig(**grpo.trl_settings(args, LR), max_prompt_length=MAX_PROMPT_LENGTH)
    trainer = CountedSDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[dpo.trl_step_clock(clock)])
    trainer.train()
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def report(results: dict[str, dict], args: argparse.Namespace, params: int, load: tuple[float, float], minutes: float) -> str:
    return grpo.turns_report("SDFT", RUNS, results, args, load, minutes, [
        grpo.model_line(params, args.vocab),
        f"Each step: {args.prompts} prompts of {dpo.PROMPT_WORDS[0]}-{dpo.PROMPT_WORDS[1]} words x {args.k} samples of at most "
        f"{args.new_tokens} new tokens, one update on all of them against the starting model shown each row's demonstration; "
        f"top-100 logits, alpha 0.5, lr {LR}.",
    ], grpo.command_line(__file__, args))


def main() -> None:
    def demos(work: str) -> None:  # each pair's prompt, its chosen answer the demonstration
        with open(os.path.join(work, "pairs.jsonl")) as rows, open(os.path.join(work, "demos.jsonl"), "w") as out:
            for row in map(json.loads, rows):
                out.write(json.dumps({"prompt": row["prompt"], "privileged_context": row["chosen"].strip()}) + "\n")

    grpo.distillation_main(__doc__, __file__, RUNS, {"pref": run_pref, "trl": run_trl}, results_path, report, demos)


if __name__ == "__main__":
    sys.exit(main())
