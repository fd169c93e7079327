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
from machine import machine

LR, MAX_PROMPT_LENGTH = 1e-6, 256
RUNS = {"pref": "pref `sdft` (its defaults)", "trl": "TRL SDFTTrainer (its defaults, no vLLM)"}


def results_path(vocab: int) -> str:
    return os.path.join(dpo.HERE, "results", f"sdft_throughput{f'_{vocab}' if vocab else ''}.md")


def run_pref(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    import torch

    import pref.train
    from pref.config import build_config
    from pref.policy import HFPolicy
    from pref.registry import load_registry

    torch.set_num_threads(dpo.THREADS)
    registry = load_registry()
    dpo.preload_model_code()
    after_imports = dpo.rss_mib()

    # instrumentation only: timestamps, token counts and turn hand-overs around pref's own code
    dpo.time_pref_steps(clock)
    sample = HFPolicy.sample

    def counted_sample(self, *a, **k):
        samples = sample(self, *a, **k)
        clock.tokens.append(int(samples.sequences.completion_mask.sum()))
        return samples

    HFPolicy.sample = counted_sample
    config = build_config(flags={
        "objective": "sdft", "model": os.path.join(args.work_dir, "model"), "dataset": [os.path.join(args.work_dir, "demos.jsonl")],
        "samples_per_prompt": args.k, "batch_size": args.prompts, "max_new_tokens": args.new_tokens, "max_prompt_length": MAX_PROMPT_LENGTH,
        "steps": args.warmup + args.steps, "lr": LR, "device": "cpu", "seed": dpo.SEED,
        "output_dir": os.path.join(args.work_dir, f"pref-run-{os.getpid()}"),
    })
    entry = clock.turn.now()
    pref.train.train(config, registry)
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def run_trl(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
    model_path = os.path.join(args.work_dir, "model")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    dataset = load_dataset("json", data_files=os.path.join(args.work_dir, "demos.jsonl"), split="train")
    config = SDFTConfig(
        output_dir=os.path.join(args.work_dir, f"trl-run-{os.getpid()}"),
        per_device_train_batch_size=args.prompts * args.k,  # completions, K of each prompt
        num_generations=args.k,
        max_completion_length=args.new_tokens,
        max_prompt_length=MAX_PROMPT_LENGTH,
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        gradient_checkpointing=False,
        use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
        seed=dpo.SEED,
    )
    trainer = CountedSDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[dpo.trl_step_clock(clock)])
    trainer.train()
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def report(results: dict[str, dict], args: argparse.Namespace, params: int, load: tuple[float, float], minutes: float) -> str:
    vocab = args.vocab or dpo.BPE_VOCAB
    lines = [
        "# SDFT throughput: pref vs TRL",
        "",
        f"Machine: {machine()} on the CPU with {dpo.THREADS} threads. Load average (1 min) {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end; the run took {minutes:.1f} min.",
        f"Versions: {dpo.versions()}.",
        "",
        f"Model: Llama, {params / 1e6:.1f}M parameters (hidden {dpo.MODEL['hidden_size']}, {dpo.MODEL['num_hidden_layers']} layers, "
        f"a vocabulary of {vocab:,} over a byte-level BPE tokenizer of {dpo.BPE_VOCAB:,} tokens trained here, untied head), random weights, fp32.",
        f"Each step: {args.prompts} prompts of {dpo.PROMPT_WORDS[0]}-{dpo.PROMPT_WORDS[1]} words x {args.k} samples of at most "
        f"{args.new_tokens} new tokens, one update on all of them against the starting model shown each row's demonstration; "
        f"top-100 logits, alpha 0.5, lr {LR}.",
        f"Over {args.steps} steps after {args.warmup} warm-up steps, the trainers taking turns step by step (waiting not counted). "
        "Tokens/step: completion tokens sampled.",
        "",
        "| run | s/step (median) | s/step (mean) | sampled tokens/s | CPU s/step | tokens/step | setup s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {RUNS[name]} | {r['median_step_s']:.2f} | {1 / r['steps_per_s']:.2f} | {r['tokens_per_step'] * r['steps_per_s']:.0f} | "
                     f"{r['cpu_s_per_step']:.2f} | {r['tokens_per_step']:.0f} | {r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    if {"pref", "trl"} <= set(results):
        pref, trl = results["pref"], results["trl"]
        lines += ["", f"pref / TRL: time per step x{pref['median_step_s'] / trl['median_step_s']:.2f} (median), "
                      f"x{trl['steps_per_s'] / pref['steps_per_s']:.2f} (mean); peak RSS x{pref['peak_rss_mib'] / trl['peak_rss_mib']:.2f}."]
    lines += ["", f"Command: `python bench/sdft_throughput.py --steps {args.steps} --warmup {args.warmup} --prompts {args.prompts} "
                  f"-k {args.k} --new-tokens {args.new_tokens} --vocab {args.vocab}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per trainer (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps before measuring (default 2)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    parser.add_argument("-k", type=int, default=2, help="samples per prompt (default 2)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per sample at most (default 64)")
    parser.add_argument("--vocab", type=int, default=0, help="the model's vocabulary (default 0: the tokenizer's 16,384)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these (default: both)")
    parser.add_argument("--work-dir", help="keep the model, data and logs here instead of a temporary folder")
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        grpo.child(args, {"pref": run_pref, "trl": run_trl})
        return

    def demos(work: str) -> None:  # each pair's prompt, its chosen answer the demonstration
        with open(os.path.join(work, "pairs.jsonl")) as rows, open(os.path.join(work, "demos.jsonl"), "w") as out:
            for row in map(json.loads, rows):
                out.write(json.dumps({"prompt": row["prompt"], "privileged_context": row["chosen"].strip()}) + "\n")

    own = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts), "-k", str(args.k),
           "--new-tokens", str(args.new_tokens), "--vocab", str(args.vocab)]
    grpo.run_in_turns(args, __file__, own, list(RUNS), results_path(args.vocab), report, demos)


if __name__ == "__main__":
    sys.exit(main())
