"""GRPO training throughput of pref against TRL 1.16's `GRPOTrainer`, at a realistic shape, on this machine.

    python bench/grpo_throughput.py [--steps 10] [--warmup 2] [--prompts 4] [-k 4] [--new-tokens 64]

Both trainers get the same model and data as `dpo_throughput.py --shape realistic`: a Llama of about 36M parameters
(hidden 512, 6 layers, untied head) over a byte-level BPE tokenizer of 16,384 tokens trained here, random weights, fp32
on the CPU with 2 torch threads; the prompts of its 256 synthetic rows (16-48 words each). Each optimizer step samples
K answers to each of `--prompts` prompts (`--new-tokens` at most: a model of random weights almost never ends one
earlier, so both trainers sample the same number of tokens), scores them with the same reward function (the answer's
word count / 10), and takes one gradient step on all of them. The settings are TRL's GRPO defaults, which pref's `grpo`
shares: `beta` 0 (no reference model), `loss_type` "dapo", one pass per rollout (`num_iterations` 1), temperature 1,
no top-p/top-k; lr 1e-6, AdamW, gradient clipping at 1.0, seed 0. TRL runs without gradient checkpointing and without
vLLM (neither is on in pref); both sample through transformers' `generate`.

The trainers take turns step by step as in `dpo_throughput.py` (its `run_children`): each in its own subprocess, only
one running at a time, none timed before all have set up, waiting for the turn not counted. Seconds per step run from
the end of one optimizer step to the end of the next: sampling, scoring and the update. Also: completion tokens
sampled per step, process CPU time per step, peak RSS. The table goes to stdout and bench/results/grpo_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import dpo_throughput as dpo  # bench/ is on sys.path when a script runs
from machine import machine

RESULTS = os.path.join(dpo.HERE, "results", "grpo_throughput.md")
LR, MAX_PROMPT_LENGTH = 1e-6, 128
RUNS = {"pref": "pref `grpo` (its defaults)", "trl": "TRL GRPOTrainer (its defaults, no vLLM)"}
REWARD = "def words(completions, **kwargs):\n    return [len(c.split()) / 10 for c in completions]\n"


def run_pref(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    return run_pref_online(args, clock, {"objective": "grpo", "dataset": [os.path.join(args.work_dir, "prompts.jsonl")],
                                         "reward": f"{os.path.join(args.work_dir, 'rewards.py')}:words", "max_prompt_length": MAX_PROMPT_LENGTH,
                                         "lr": LR})


def run_pref_online(args: argparse.Namespace, clock: dpo.StepClock, flags: dict) -> dict:
    """`pref run` of an online objective with `flags`, on the work folder's model, `args.prompts` x `args.k` samples of
    `args.new_tokens` a step, timed by `clock`, counting the tokens sampled."""
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
        **flags, "model": os.path.join(args.work_dir, "model"), "samples_per_prompt": args.k, "batch_size": args.prompts,
        "max_new_tokens": args.new_tokens, "steps": args.warmup + args.steps, "device": "cpu", "seed": dpo.SEED,
        "output_dir": os.path.join(args.work_dir, f"pref-run-{os.getpid()}"),
    })
    entry = clock.turn.now()
    pref.train.train(config, registry)
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def run_trl(args: argparse.Namespace, clock: dpo.StepClock) -> dict:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(dpo.THREADS)
    dpo.preload_model_code()
    after_imports = dpo.rss_mib()
    sys.path.insert(0, args.work_dir)
    from rewards import words  # the same function pref imports

    class CountedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, *a, **k):
            out = super()._generate_and_score_completions(*a, **k)
            clock.tokens.append(int(out["completion_mask"].sum()))
            return out

    entry = clock.turn.now()
    model, tokenizer, dataset = trl_inputs(args, "prompts.jsonl")
    config = GRPOConfig(**trl_settings(args, LR))
    trainer = CountedGRPOTrainer(model=model, reward_funcs=words, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[dpo.trl_step_clock(clock)])
    trainer.train()
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def model_line(params: int, vocab: int) -> str:
    """The report's line on the model `dpo.build_model` built, `vocab` (0: the tokenizer's) its vocabulary."""
    return (f"Model: Llama, {params / 1e6:.1f}M parameters (hidden {dpo.MODEL['hidden_size']}, {dpo.MODEL['num_hidden_layers']} layers, "
            f"a vocabulary of {vocab or dpo.BPE_VOCAB:,} over a byte-level BPE tokenizer of {dpo.BPE_VOCAB:,} tokens trained here, untied "
            "head), random weights, fp32.")


def trl_inputs(args: argparse.Namespace, data: str):
    """The work folder's model (fp32), its tokenizer (padding on the left, as TRL's online trainers want) and the dataset `data`."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = os.path.join(args.work_dir, "model")
    return (AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), AutoTokenizer.from_pretrained(model_path, padding_side="left"),
            load_dataset("json", data_files=os.path.join(args.work_dir, data), split="train"))


def trl_settings(args: argparse.Namespace, lr: float) -> dict:
    """The settings of a TRL online trainer's config that match pref's run: K samples of each of `args.prompts` prompts a step."""
    return dict(
        output_dir=os.path.join(args.work_dir, f"trl-run-{os.getpid()}"),
        per_device_train_batch_size=args.prompts * args.k,  # completions, K of each prompt
        num_generations=args.k,
        max_completion_length=args.new_tokens,
        max_steps=args.warmup + args.steps,
        learning_rate=lr,
        gradient_checkpointing=False,
        use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
        seed=dpo.SEED,
    )


def child(args: argparse.Namespace, runners: dict | None = None) -> None:
    """One trainer's process: `runners[args.child](args, clock)` (by default GRPO's pref and TRL runs), its figures to `args.result`."""
    dpo.use_shape("realistic")
    go_fd, done_fd = (int(fd) for fd in args.turn_fds.split(","))
    turn = dpo.Turn(go_fd, done_fd)
    turn.take()  # not even the imports run out of turn
    cache = tempfile.mkdtemp(prefix=f"cache-{args.child}-", dir=args.work_dir)
    os.environ["PREF_CACHE"] = cache
    os.environ["HF_DATASETS_CACHE"] = os.path.join(cache, "datasets")
    clock = dpo.StepClock(turn)
    result = (runners or {"pref": run_pref, "trl": run_trl})[args.child](args, clock)
    with open(args.result, "w") as f:
        json.dump(result, f)


def report(results: dict[str, dict], args: argparse.Namespace, params: int, load: tuple[float, float], minutes: float) -> str:
    return turns_report("GRPO", RUNS, results, args, load, minutes, [
        f"Model: Llama, {params / 1e6:.1f}M parameters (hidden {dpo.MODEL['hidden_size']}, {dpo.MODEL['num_hidden_layers']} layers, "
        f"a byte-level BPE tokenizer of {dpo.BPE_VOCAB:,} tokens trained here, untied head), random weights, fp32.",
        f"Each step: {args.prompts} prompts of {dpo.PROMPT_WORDS[0]}-{dpo.PROMPT_WORDS[1]} words x {args.k} samples of at most "
        f"{args.new_tokens} new tokens, scored by the same function, one update on all of them; beta 0, loss_type dapo, lr {LR}.",
    ], f"python bench/grpo_throughput.py --steps {args.steps} --warmup {args.warmup} --prompts {args.prompts} -k {args.k} "
       f"--new-tokens {args.new_tokens}")


def turns_report(what: str, runs: dict[str, str], results: dict[str, dict], args: argparse.Namespace, load: tuple[float, float],
                 minutes: float, setup: list[str], command: str) -> str:
    """The markdown table of an online trainer's throughput benchmark (`what`: GRPO, SDFT), `setup` its lines on the model and step."""
    lines = [
        f"# {what} throughput: pref vs TRL",
        "",
        f"Machine: {machine()} on the CPU with {dpo.THREADS} threads. Load average (1 min) {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end; the run took {minutes:.1f} min.",
        f"Versions: {dpo.versions()}.",
        "",
        *setup,
        f"Over {args.steps} steps after {args.warmup} warm-up steps, the trainers taking turns step by step (waiting not counted). "
        "Tokens/step: completion tokens sampled.",
        "",
        "| run | s/step (median) | s/step (mean) | sampled tokens/s | CPU s/step | tokens/step | setup s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {runs[name]} | {r['median_step_s']:.2f} | {1 / r['steps_per_s']:.2f} | {r['tokens_per_step'] * r['steps_per_s']:.0f} | "
                     f"{r['cpu_s_per_step']:.2f} | {r['tokens_per_step']:.0f} | {r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    if {"pref", "trl"} <= set(results):
        pref, trl = results["pref"], results["trl"]
        lines += ["", f"pref / TRL: time per step x{pref['median_step_s'] / trl['median_step_s']:.2f} (median), "
                      f"x{trl['steps_per_s'] / pref['steps_per_s']:.2f} (mean); peak RSS x{pref['peak_rss_mib'] / trl['peak_rss_mib']:.2f}."]
    return "\n".join([*lines, "", f"Command: `{command}`", ""])


def online_arguments(doc: str, runs: dict[str, str], steps: int, k: int) -> argparse.ArgumentParser:
    """The command line of an online trainer's throughput benchmark, with these defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=steps, help=f"measured steps per trainer (default {steps})")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps before measuring (default 2)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    parser.add_argument("-k", type=int, default=k, help=f"samples per prompt (default {k})")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per sample at most (default 64)")
    parser.add_argument("--only", nargs="+", choices=list(runs), help="run only these (default: both)")
    parser.add_argument("--work-dir", help="keep the model, data and logs here instead of a temporary folder")
    parser.add_argument("--child", choices=list(runs), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = online_arguments(__doc__, RUNS, steps=10, k=4).parse_args()
    if args.child:
        child(args)
        return

    own = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts), "-k", str(args.k),
           "--new-tokens", str(args.new_tokens)]

    def prompts(work: str) -> None:
        with open(os.path.join(work, "pairs.jsonl")) as rows, open(os.path.join(work, "prompts.jsonl"), "w") as out:
            out.writelines(json.dumps({"prompt": json.loads(row)["prompt"]}) + "\n" for row in rows)
        with open(os.path.join(work, "rewards.py"), "w") as f:
            f.write(REWARD)

    run_in_turns(args, __file__, own, list(RUNS), RESULTS, report, prompts)


def distillation_main(doc: str, script: str, runs: dict[str, str], runners: dict, results_path, report, write_data) -> None:
    """The command line of a self-distillation benchmark (6 steps, K 2, and `--vocab`): a child's run (`runners`), or all of
    them in turns (`run_in_turns`, its results file `results_path(vocab)`)."""
    parser = online_arguments(doc, runs, steps=6, k=2)
    parser.add_argument("--vocab", type=int, default=0, help="the model's vocabulary (default 0: the tokenizer's 16,384)")
    args = parser.parse_args()
    if args.child:
        child(args, runners)
        return
    own = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts), "-k", str(args.k),
           "--new-tokens", str(args.new_tokens), "--vocab", str(args.vocab)]
    run_in_turns(args, script, own, list(runs), results_path(args.vocab), report, write_data)


def command_line(script: str, args: argparse.Namespace) -> str:
    """The command that reproduces a self-distillation benchmark's run."""
    return (f"python bench/{os.path.basename(script)} --steps {args.steps} --warmup {args.warmup} --prompts {args.prompts} -k {args.k} "
            f"--new-tokens {args.new_tokens} --vocab {args.vocab}")


def run_in_turns(args: argparse.Namespace, script: str, own: list[str], runs: list[str], results_path: str, report, write_data) -> None:
    """Build the realistic model and its 256 synthetic pairs in a work folder, `write_data(work)` there, run `script`'s children
    (`--only`, else all `runs`) in turns with the arguments `own`, print `report(...)`, and write it to `results_path` when every run
    finished."""
    dpo.use_shape("realistic")
    started, load = time.perf_counter(), os.getloadavg()[0]
    work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="pref-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        params = dpo.build_model(os.path.join(work, "model"), getattr(args, "vocab", 0))
        dpo.build_pairs(os.path.join(work, "pairs.jsonl"), os.path.join(work, "model"), 256)
        write_data(work)
        names = args.only or runs
        print(f"running {', '.join(names)} in turns; logs in {work}", file=sys.stderr, flush=True)
        results = dpo.run_children(names, args, work, script, own)
        text = report(results, args, params, (load, os.getloadavg()[0]), (time.perf_counter() - started) / 60)
        print(text)
        if set(results) == set(runs):  # a partial run (--only, a failure) does not replace the figures
            os.makedirs(os.path.dirname(results_path), exist_ok=True)
            with open(results_path, "w") as f:
                f.write(text)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
