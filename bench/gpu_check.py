"""pref on a GPU at a real model size: DPO against TRL, and one online DivPO run, in bf16.

    python bench/gpu_check.py            # on a CUDA GPU (under 8 minutes on an H200)
    python bench/gpu_check.py --tiny     # the same code on the CPU with a tiny model (a minute or two)

Builds a Qwen2-shaped model with random weights here (no download: the hub is not
reachable): about 0.5B parameters (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings: Qwen2.5-0.5B's shape), with a
byte-level BPE tokenizer of 16k tokens trained here (the rest of the vocabulary rows
exist in the model, so the logits are as large as Qwen's). Each trainer runs in its own
process, so its peak GPU memory (`torch.cuda.max_memory_allocated`) is its own:

- pref DPO: `--dtype bfloat16` (trained weights kept in float32, computing under bf16
  autocast), the reference log-probs cached before training (pref's default);
- TRL 1.16 DPOTrainer: `precompute_ref_log_probs=True`, `bf16=True` (float32 weights under
  autocast: like for like), gradient checkpointing off as for pref;
- pref DPO with QLoRA: `--lora --quantize nf4` (the decoder's linear layers in 4 bits under
  r-16 adapters on every linear layer), otherwise as the first: what the 4-bit base saves;
- pref DPO with `--gradient-checkpointing`, then with `--activation-offloading` too (the checkpointed layers' inputs
  kept in CPU memory): what each saves of the peak, for what time;
- pref DivPO online with the `unique-nouns` reward (distinct nouns per answer: it varies even
  on a random model's text, where answers are rarely a single known noun): the step time
  split into sampling, scoring and update.

Reports steps/s, tokens/s (real, unpadded tokens of the training forward passes), peak
GPU memory and model FLOPs utilisation: 6 x parameters x tokens per step over the step
time, against `--peak-tflops` (989: H100/H200 SXM dense bf16). Prints a markdown table
and writes it to bench/results/gpu_check.md (bench/results/gpu_check_tiny.md with --tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from dpo_throughput import build_bpe_tokenizer, corpus_words  # bench/ is on sys.path when a script runs
from machine import machine

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1_000_000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=8_192, tie_word_embeddings=True, max_position_embeddings=1024, rope_theta=1_000_000.0)
SIZES = {  # steps, batch size (pairs / prompts), pairs, prompt words, answer words, DivPO samples per prompt
    "full": dict(steps=30, warmup=5, batch_size=8, pairs=400, prompt_words=(16, 48), answer_words=(16, 256), divpo_steps=10, k=16),
    "tiny": dict(steps=3, warmup=1, batch_size=2, pairs=16, prompt_words=(4, 8), answer_words=(4, 16), divpo_steps=2, k=4),
}


def build(work: str, tiny: bool) -> int:
    """The model and tokenizer in work/model, the pairs in work/pairs.jsonl; return the parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_bpe_tokenizer(4_096 if tiny else 16_384)
    tokenizer.chat_template = None  # plain-text prompts, the same for pref and TRL
    shape = TINY if tiny else QWEN2_05B
    config = Qwen2Config(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **{**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))})
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(os.path.join(work, "model"))  # float32 on disk; each trainer picks its precision
    tokenizer.save_pretrained(os.path.join(work, "model"))
    size = SIZES["tiny" if tiny else "full"]
    words, rng = corpus_words(), random.Random(SEED)

    def text(lengths: tuple[int, int]) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lengths)))

    with open(os.path.join(work, "pairs.jsonl"), "w") as f:
        for _ in range(size["pairs"]):
            f.write(json.dumps({"prompt": text(size["prompt_words"]), "chosen": " " + text(size["answer_words"]),
                                "rejected": " " + text(size["answer_words"])}) + "\n")
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------


class Steps:
    """Wall-clock stamps at the end of each optimizer step, and the real tokens each trained on."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.start = time.perf_counter()

    def summary(self, warmup: int, device: str) -> dict:
        import torch

        ends = [self.start] + self.ends
        measured = ends[warmup:]
        steps = len(measured) - 1
        seconds = measured[-1] - measured[0]
        tokens = sum(self.tokens[warmup:])
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return {"steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds, "tokens_per_step": tokens / max(1, steps), "peak_gib": peak}


def pref_config(args: argparse.Namespace, objective: str, **flags) -> object:
    from pref.config import build_config

    return build_config(flags={"objective": objective, "model": os.path.join(args.work_dir, "model"), "device": args.device,
                               "dtype": "bfloat16", "output_dir": os.path.join(args.work_dir, f"{objective}-run"), "seed": SEED,
                               "lr": 1e-5, "max_length": 1024, "max_prompt_length": 256, **flags})


def child_pref_dpo(args: argparse.Namespace, size: dict, **flags) -> dict:
    import torch

    import pref.train
    from pref.policy import HFPolicy
    from pref.plugins.loggers import ProgressBar
    from pref.registry import load_registry

    steps = Steps()

    bar_start, bar_show = ProgressBar.start, ProgressBar.show

    def timed_start(self, total_steps, start_step):  # right before the first step
        bar_start(self, total_steps, start_step)
        if args.device == "cuda":
            torch.cuda.synchronize()
        steps.start = time.perf_counter()

    def timed_show(self, step, metrics):  # after each step
        if args.device == "cuda":
            torch.cuda.synchronize()
        steps.ends.append(time.perf_counter())
        bar_show(self, step, metrics)

    logps = HFPolicy.logps

    def counted(self, sequences, *a, **k):
        if torch.is_grad_enabled():
            steps.tokens.append(int(sequences.attention_mask.sum()))
        return logps(self, sequences, *a, **k)

    ProgressBar.start, ProgressBar.show, HFPolicy.logps = timed_start, timed_show, counted
    config = pref_config(args, "dpo", dataset=[os.path.join(args.work_dir, "pairs.jsonl")], steps=size["warmup"] + size["steps"],
                         batch_size=size["batch_size"], **flags)
    pref.train.train(config, load_registry())
    return steps.summary(size["warmup"], args.device)  # DPO scores chosen and rejected rows in one logps call per step


def child_trl_dpo(args: argparse.Namespace, size: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    steps = Steps()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            steps.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            steps.ends.append(time.perf_counter())

    class Counted(DPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                steps.tokens.append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *a, **k)

    path = os.path.join(args.work_dir, "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = load_dataset("json", data_files=os.path.join(args.work_dir, "pairs.jsonl"), split="train")
    config = DPOConfig(
        output_dir=os.path.join(args.work_dir, "trl-run"), per_device_train_batch_size=size["batch_size"],
        max_steps=size["warmup"] + size["steps"], learning_rate=1e-5, max_length=1024, precompute_ref_log_probs=True,
        gradient_checkpointing=False, use_cpu=args.device == "cpu", bf16=True, report_to="none", logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
    )
    Counted(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]).train()
    return steps.summary(size["warmup"], args.device)


def child_pref_divpo(args: argparse.Namespace, size: dict) -> dict:
    import torch

    from pref.registry import load_registry
    from pref.train import train

    config = pref_config(args, "divpo", reward="unique-nouns", steps=size["divpo_steps"], batch_size=size["batch_size"],
                         samples_per_prompt=size["k"], max_new_tokens=16)
    out = train(config, load_registry())
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]  # the first step warms up
    mean = {key: sum(r.get(key, 0.0) for r in rows) / max(1, len(rows)) for key in ("time/sampling", "time/scoring", "time/update")}
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return {**mean, "peak_gib": peak}


def child_pref_dpo_qlora(args: argparse.Namespace, size: dict) -> dict:
    return child_pref_dpo(args, size, adapter="lora", quantize="nf4", output_dir=os.path.join(args.work_dir, "dpo-qlora-run"))


def child_pref_dpo_checkpointing(args: argparse.Namespace, size: dict) -> dict:
    return child_pref_dpo(args, size, gradient_checkpointing=True, output_dir=os.path.join(args.work_dir, "dpo-checkpointing-run"))


def child_pref_dpo_offloading(args: argparse.Namespace, size: dict) -> dict:
    import pref.offload

    if args.device == "cpu":  # --tiny: the CPU's tensors are "offloaded" to fresh CPU memory, to run the same code
        pref.offload.STAYS_ON = ()
    return child_pref_dpo(args, size, gradient_checkpointing=True, activation_offloading=True,
                          output_dir=os.path.join(args.work_dir, "dpo-offloading-run"))


CHILDREN = {"pref-dpo": child_pref_dpo, "trl-dpo": child_trl_dpo, "pref-dpo-qlora": child_pref_dpo_qlora,
            "pref-dpo-checkpointing": child_pref_dpo_checkpointing, "pref-dpo-offloading": child_pref_dpo_offloading,
            "pref-divpo": child_pref_divpo}


# ---------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, measures nothing")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU (default: H100/H200 SXM)")
    parser.add_argument("--only", nargs="+", choices=list(CHILDREN), help="run only these")
    parser.add_argument("--work-dir", help="keep the model, data and logs here")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    if args.child:
        os.environ["PREF_CACHE"] = os.path.join(args.work_dir, f"cache-{args.child}")
        result = CHILDREN[args.child](args, size)
        with open(os.path.join(args.work_dir, f"{args.child}.json"), "w") as f:
            json.dump(result, f)
        return

    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --tiny to check the script on the CPU")
    started = time.perf_counter()
    work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="pref-gpu-check-")
    os.makedirs(work, exist_ok=True)
    params = build(work, args.tiny)
    print(f"model: {params / 1e6:.0f}M parameters; built in {time.perf_counter() - started:.0f} s; logs in {work}", file=sys.stderr, flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    results = {}
    for name in args.only or list(CHILDREN):
        t0 = time.perf_counter()
        with open(os.path.join(work, f"{name}.log"), "w") as log:
            code = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--work-dir", work, "--device", device]
                                  + (["--tiny"] if args.tiny else []), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        print(f"{name}: exit {code} after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if code == 0:
            with open(os.path.join(work, f"{name}.json")) as f:
                results[name] = json.load(f)
        else:
            with open(os.path.join(work, f"{name}.log")) as f:
                print(f.read()[-3000:], file=sys.stderr)
    text = report(results, params, args, size, device, (time.perf_counter() - started) / 60)
    print(text)
    path = os.path.join(HERE, "results", "gpu_check_tiny.md" if args.tiny else "gpu_check.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def report(results: dict, params: int, args: argparse.Namespace, size: dict, device: str, minutes: float) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (--tiny: the figures check the script, they measure nothing)"
    lines = [
        f"# GPU check: {params / 1e6:.0f}M-parameter Qwen2-shaped model, bf16 ({time.strftime('%Y-%m-%d')})", "",
        f"Device: {gpu}. Machine: {machine()}. The whole check took {minutes:.1f} min.",
        f"DPO: {size['steps']} steps measured after {size['warmup']} warm-up steps, batch {size['batch_size']} pairs, prompts "
        f"{size['prompt_words'][0]}-{size['prompt_words'][1]} words, answers {size['answer_words'][0]}-{size['answer_words'][1]} words. "
        f"MFU: 6 x {params / 1e6:.0f}M parameters x real tokens per step / step time / {args.peak_tflops:.0f} TFLOP/s.", "",
        "| DPO | steps/s | tokens/s | peak GPU memory GiB | MFU |", "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("pref-dpo", "pref (cached reference log-probs)"), ("trl-dpo", "TRL 1.16 DPOTrainer (precomputed reference)"),
                        ("pref-dpo-qlora", "pref, QLoRA (--lora --quantize nf4)"), ("pref-dpo-checkpointing", "pref, --gradient-checkpointing"),
                        ("pref-dpo-offloading", "pref, --gradient-checkpointing --activation-offloading")):
        r = results.get(name)
        if r:
            mfu = 6 * params * r["tokens_per_s"] / (args.peak_tflops * 1e12)
            mfu_text = "n/a (no weight gradients)" if "qlora" in name else f"{100 * mfu:.1f}%"
            lines.append(f"| {label} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | {mfu_text} |")
        else:
            lines.append(f"| {label} | failed | | | |")
    r = results.get("pref-divpo")
    lines += ["", f"Online DivPO (unique-nouns reward, {size['batch_size']} prompts x {size['k']} samples, up to 16 new tokens; mean of steps 2-{size['divpo_steps']}):", "",
              "| sampling s | scoring s | update s | peak GPU memory GiB |", "|---:|---:|---:|---:|"]
    if r:
        lines.append(f"| {r['time/sampling']:.3f} | {r['time/scoring']:.3f} | {r['time/update']:.3f} | {r['peak_gib']:.2f} |")
    else:
        lines.append("| failed | | | |")
    lines += ["", f"Command: `python bench/gpu_check.py{' --tiny' if args.tiny else ''}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
