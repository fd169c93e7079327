"""SDPO training throughput and memory of pref against TRL 1.16's experimental `SDPOTrainer`, at a realistic shape, on this machine.

    python bench/sdpo_throughput.py [--steps 6] [--warmup 2] [--prompts 4] [-k 2] [--new-tokens 64] [--vocab 0]

Both trainers get the model of `grpo_throughput.py` (a Llama of about 36M parameters, hidden 512, 6 layers, untied head, over a
byte-level BPE tokenizer of 16,384 tokens trained here; `--vocab` widens its embeddings and output layer, the tokenizer
unchanged), random weights, fp32 on the CPU with 2 torch threads, and the prompts of its 256 synthetic rows (16-48 words). Each
optimizer step samples K answers to each of `--prompts` prompts (`--new-tokens` at most: a model of random weights almost never
ends one earlier) and scores them with the same reward function, 1 for an answer of an even number of words and 0 for an odd
one, so that about half of the samples have a sibling that succeeded and are re-prompted for the teacher (their prompt, that
sibling's answer as the solution, then their own answer). The settings are TRL's SDPO defaults, which pref's `sdpo` shares:
distillation only (weight 1), sampled-token reverse KL, the `ema` teacher (rate 0.05, synced every step), one pass per
rollout; prompts cut at 256 tokens on both sides; lr 1e-6, AdamW, gradient clipping at 1.0, seed 0. Neither uses gradient
checkpointing or vLLM; both sample through transformers' `generate`. TRL runs its teacher on every sample (those without a
solution on their own prompt, their loss masked out); pref only on the re-prompted ones.

The trainers take turns step by step (`dpo_throughput.run_children`). Seconds per step run from the end of one optimizer step
to the end of the next: sampling, scoring, the teacher's forward and the update. Also: completion tokens sampled per step,
process CPU time per step, peak RSS. The table goes to stdout and bench/results/sdpo_throughput.md (or sdpo_throughput_VOCAB.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import dpo_throughput as dpo  # bench/ is on sys.path when a script runs
import grpo_throughput as grpo

LR, MAX_PROMPT_LENGTH = 1e-6, 256
RUNS = {"pref": "pref `sdpo` (its defaults)", "trl": "TRL SDPOTrainer (its defaults, no vLLM)"}
REWARD = "def even(completions, **kwargs):\n    return [float(len(c.split()) % 2 == 0) for c in completions]\n"


def results_path(vocab: int) -> str:
    return os.path.join(dpo.HERE, "results", f"sdpo_throughput{f'_{vocab}' if vocab else ''}.md")


def run_pref(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    return grpo.run_pref_online(args, clock, {"objective": "sdpo", "dataset": [os.path.join(args.work_dir, "prompts.jsonl")],
                                              "reward": f"{os.path.join(args.work_dir, 'rewards.py')}:even",
                                              "max_prompt_length": MAX_PROMPT_LENGTH, "lr": LR})


def run_trl(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    import torch
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    torch.set_num_threads(dpo.THREADS)
    dpo.preload_model_code()
    after_imports = dpo.rss_mib()
    sys.path.insert(0, args.work_dir)
    from rewards import even  # the same function pref imports

    class CountedSDPOTrainer(SDPOTrainer):
        def sample_rollouts(self, *a, **k):
            out = super().sample_rollouts(*a, **k)
            clock.tokens.append(int(out["completion_mask"].sum()))
            return out

    entry = clock.turn.now()
    model, tokenizer, dataset = grpo.trl_inputs(args, "prompts.jsonl")
    config = SDPOConfig(**grpo.trl_settings(args, LR), max_prompt_length=MAX_PROMPT_LENGTH)
    trainer = CountedSDPOTrainer(model=model, reward_funcs=even, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[dpo.trl_step_clock(clock)])
    trainer.train()
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def report(results: dict[str, dict], args: argparse.Namespace, params: int, load: tuple[float, float], minutes: float) -> str:
    return grpo.turns_report("SDPO", RUNS, results, args, load, minutes, [
        grpo.model_line(params, args.vocab),
        f"Each step: {args.prompts} prompts of {dpo.PROMPT_WORDS[0]}-{dpo.PROMPT_WORDS[1]} words x {args.k} samples of at most "
        f"{args.new_tokens} new tokens scored 1 for an even number of words, one update on all of them against the policy's average "
        f"shown a successful sibling's answer; sampled-token reverse KL, lr {LR}.",
    ], grpo.command_line(__file__, args))


def main() -> None:
    def prompts(work: str) -> None:
        with open(os.path.join(work, "pairs.jsonl")) as rows, open(os.path.join(work, "prompts.jsonl"), "w") as out:
            out.writelines(json.dumps({"prompt": json.loads(row)["prompt"]}) + "\n" for row in rows)
        with open(os.path.join(work, "rewards.py"), "w") as f:
            f.write(REWARD)

    grpo.distillation_main(__doc__, __file__, RUNS, {"pref": run_pref, "trl": run_trl}, results_path, report, prompts)


if __name__ == "__main__":
    sys.exit(main())
