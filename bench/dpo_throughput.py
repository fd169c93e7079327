"""DPO training throughput of pref against TRL's `DPOTrainer`, on this machine.

    python bench/dpo_throughput.py [--steps N] [--batch-size B] [--pairs N] [--warmup N]

Both trainers get the same small Llama (built here, no download), the same synthetic
preference pairs, batch size, step count, learning rate, sequence limits, fp32 on the CPU
and the same number of torch threads. Each runs in its own subprocess, so its peak RSS is
its own. Runs:

- pref: `pref.train.train` with its defaults (`reference: auto`, which for DPO on a fixed
  dataset means reference log-probs computed once before training and cached on disk);
- TRL: `DPOTrainer` with `ref_model=None`, so it loads a second copy of the model as the
  reference and runs it on every batch (its default);
- TRL precomputed: the same with `precompute_ref_log_probs=True`, like for like with pref.

Gradient checkpointing is off for TRL (its `DPOConfig` turns it on by default): pref does
not checkpoint, and recomputing activations would make TRL slower for a reason that has
nothing to do with the trainer. `--trl-defaults` adds a run with TRL's own default.

The trainers take turns: all the subprocesses start, but only one runs at a time, and each
hands the turn on after every training step and every reference-precompute batch; none
starts training before all have finished their setup, so the steps of all trainers
interleave one by one. Time spent waiting for the turn is left out of every figure. On a
machine that other jobs load unevenly, every trainer then sees the same mix of quiet and
busy moments; run one after the other, whichever ran during a busy minute would lose.

Steps/s is measured over `--steps` steps after `--warmup` warm-up steps, from the end of
one optimizer step to the end of the next (so it includes batching and tokenization).
"Setup" runs from the trainer call to the first step (model load, tokenization, reference
precompute); "total" is setup plus every step. The table goes to stdout and to
bench/results/dpo_throughput.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from machine import machine  # bench/machine.py (bench/ is on sys.path when a script runs)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "dpo_throughput.md")  # --shape realistic: dpo_throughput_realistic.md
THREADS = 2
MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
LR = 5e-5
SEED = 0

# The model: a Llama over the default model's word-level vocabulary, about 10M parameters.
MODEL = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6)
PROMPT_WORDS = (8, 24)
COMPLETION_WORDS = (32, 64)
SHAPE = "small"
VOCAB = 0  # 0: the tokenizer's own size

# `--shape realistic`: a Llama of about 36M parameters over a byte-level BPE tokenizer of 16k
# tokens trained here on generated text, with prompts of 16-48 words and answers of 16-256
# words (very uneven, as real preference data is). `--memory-table` also runs it with the
# model's vocabulary raised to 64k and 151k rows (Qwen's size): the extra rows are never
# produced by the tokenizer, but the embedding, the LM head and the logits are as large as
# a real vocabulary's, which is all a memory figure depends on.
REALISTIC = dict(
    MODEL=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8),
    PROMPT_WORDS=(16, 48), COMPLETION_WORDS=(16, 256), MAX_PROMPT_LENGTH=128,
)
BPE_VOCAB = 16_384
MEMORY_VOCABS = (16_384, 65_536, 151_936)

RUNS = {
    "pref": "pref (cached reference log-probs, its default)",
    "trl": "TRL DPOTrainer (reference model in memory, its default)",
    "trl-precomputed": "TRL DPOTrainer, `precompute_ref_log_probs=True`",
    "trl-defaults": "TRL DPOTrainer, reference model, gradient checkpointing on (DPOConfig default)",
}


# ---------------------------------------------------------------------------------------
# Model and data, built once by the parent
# ---------------------------------------------------------------------------------------


def use_shape(name: str) -> None:
    """Switch the module's model and data constants to `--shape NAME` (in the parent and every child)."""
    global SHAPE, MODEL, PROMPT_WORDS, COMPLETION_WORDS, MAX_PROMPT_LENGTH
    SHAPE = name
    if name == "realistic":
        MODEL, PROMPT_WORDS, COMPLETION_WORDS = REALISTIC["MODEL"], REALISTIC["PROMPT_WORDS"], REALISTIC["COMPLETION_WORDS"]
        MAX_PROMPT_LENGTH = REALISTIC["MAX_PROMPT_LENGTH"]


def corpus_words() -> list[str]:
    """40,000 common English words, most frequent first (wordfreq ships them: no download)."""
    import wordfreq

    return [w for w in wordfreq.top_n_list("en", 40_000) if w.isalpha()]


@functools.lru_cache(maxsize=None)
def build_bpe_tokenizer(vocab_size: int) -> object:
    """A byte-level BPE tokenizer of `vocab_size` tokens, trained on Zipf-distributed generated text (once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = corpus_words()
    rng = random.Random(SEED)
    weights = [1 / (rank + 10) for rank in range(len(words))]
    lines = [" ".join(rng.choices(words, weights, k=24)) for _ in range(20_000)]
    lines += [" ".join(words[i : i + 24]) for i in range(0, len(words), 24)]  # every word at least once
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_model(path: str, vocab: int = 0) -> int:
    """Save a randomly initialised Llama and its tokenizer (no chat template) to `path`; return its parameter count.

    The small shape uses the default model's word-level tokenizer, the realistic one a
    16k BPE tokenizer; `vocab` raises the model's vocabulary above the tokenizer's.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if SHAPE == "realistic":
        tokenizer = build_bpe_tokenizer(BPE_VOCAB)
    else:
        from tokenizers import decoders, normalizers

        from pref.plugins.default_model import default_tokenizer

        tokenizer = default_tokenizer()
        # No space put in front of each text: TRL tokenizes prompt + " completion" as one
        # text and pref the two apart, and both give the same ids only without it.
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([])
        tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    # Plain-text prompts: with a chat template pref would wrap string prompts in it and TRL
    # would not, and the two would train on different sequences.
    tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **MODEL,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def build_pairs(path: str, model_path: str, pairs: int) -> None:
    """`pairs` prompt/chosen/rejected rows of random words (small shape: the default tokenizer's whole-word
    tokens such as "Ġriver", one token each; realistic shape: common English words, one or more BPE tokens each)."""
    from transformers import AutoTokenizer

    if SHAPE == "realistic":
        words = corpus_words()
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 2)
    rng = random.Random(SEED)

    def text(lengths: tuple[int, int]) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lengths)))

    with open(path, "w") as f:
        for _ in range(pairs):
            # completions start with a space, so tokenizing prompt + completion (TRL) gives
            # the same ids as tokenizing them apart (pref)
            row = {"prompt": text(PROMPT_WORDS), "chosen": " " + text(COMPLETION_WORDS), "rejected": " " + text(COMPLETION_WORDS)}
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------
# The children: one trainer each
# ---------------------------------------------------------------------------------------


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Turn:
    """This trainer's side of the turn-taking: block until the parent hands over the turn.

    `now()` is a clock that stops while waiting, so no figure counts another trainer's work.
    """

    def __init__(self, go_fd: int | None, done_fd: int | None):
        self.go_fd, self.done_fd = go_fd, done_fd  # None: a child that runs alone (the memory table)
        self.waited = 0.0

    def take(self) -> None:
        if self.go_fd is None:
            return
        start = time.perf_counter()
        if os.read(self.go_fd, 1) != b"g":
            sys.exit("the benchmark's parent process went away")
        self.waited += time.perf_counter() - start

    def pass_on(self, message: bytes = b"y") -> None:
        """Hand the turn back (b"r": and wait until every trainer is ready to train) and wait for the next."""
        if self.done_fd is None:
            return
        os.write(self.done_fd, message)
        self.take()

    def now(self) -> float:
        return time.perf_counter() - self.waited


class StepClock:
    """Active-time stamps: the start of the first step, then the end of each step."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.first_start: float | None = None
        self.cpu_start = 0.0
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time (all threads) at the same moments
        self.tokens: list[int] = []  # padded tokens in each training forward (2B rows x width)
        self.precompute_s = 0.0

    def start(self) -> None:
        if self.first_start is None:
            self.turn.pass_on(b"r")  # all trainers finish their setup before any step is timed
            self.rss_at_first_step = rss_mib()
            self.first_start = self.turn.now()
            self.cpu_start = time.process_time()

    def end_step(self) -> None:
        self.ends.append(self.turn.now())
        self.cpu_ends.append(time.process_time())
        self.turn.pass_on()

    def summary(self, entry: float, warmup: int, steps: int, after_imports_mib: float) -> dict:
        ends, last = self.ends, warmup + steps - 1
        if len(ends) <= last or self.first_start is None:
            raise RuntimeError(f"expected {warmup + steps} steps, timed {len(ends)}")
        starts = [self.first_start] + ends
        durations = sorted(ends[i] - starts[i] for i in range(warmup, last + 1))
        cpu_start = self.cpu_ends[warmup - 1] if warmup else self.cpu_start
        tokens = self.tokens[warmup : last + 1]
        return {
            "steps_per_s": steps / (ends[last] - starts[warmup]),
            "median_step_s": durations[len(durations) // 2],
            "step_s": [ends[i] - starts[i] for i in range(len(ends))],
            "cpu_s_per_step": (self.cpu_ends[last] - cpu_start) / steps,
            "tokens_per_step": sum(tokens) / max(1, len(tokens)),
            "setup_s": self.first_start - entry,
            "precompute_s": self.precompute_s,
            "total_s": ends[last] - entry,
            "peak_rss_mib": rss_mib(),
            "rss_after_imports_mib": after_imports_mib,
            "rss_at_first_step_mib": self.rss_at_first_step,
            "load_average": os.getloadavg()[0],
        }


def preload_model_code() -> None:
    """Import the Llama and accelerate code now: transformers imports it lazily, and TRL's own
    imports pull in more of it than pref's, which would count against pref's setup time."""
    import accelerate  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401


def time_pref_steps(clock: StepClock) -> None:
    """Stamp `clock` as pref's training loop starts and ends each step (its progress bar's `start` and `show`)."""
    from pref.plugins.loggers import ProgressBar

    bar_start, bar_show = ProgressBar.start, ProgressBar.show

    def timed_start(self, total_steps, start_step):  # right before the first step
        bar_start(self, total_steps, start_step)
        clock.start()

    def timed_show(self, step, metrics):  # after each step
        clock.end_step()
        bar_show(self, step, metrics)

    ProgressBar.start, ProgressBar.show = timed_start, timed_show


def trl_step_clock(clock: StepClock):
    """A callback that stamps `clock` as a TRL trainer starts and ends each step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.end_step()

    return Clock()


def run_pref(args: argparse.Namespace, clock: StepClock) -> dict:
    import torch

    import pref.train
    from pref.config import build_config
    from pref.policy import HFPolicy
    from pref.reference import CachedReference, FrozenReference
    from pref.registry import load_registry

    torch.set_num_threads(THREADS)
    registry = load_registry()
    preload_model_code()
    after_imports = rss_mib()
    turn = clock.turn

    # instrumentation only: timestamps, token counts and turn hand-overs around pref's own code
    time_pref_steps(clock)
    class TimedCachedReference(CachedReference):
        @classmethod
        def build(cls, *a, **k):
            start = turn.now()
            out = super().build(*a, **k)
            clock.precompute_s += turn.now() - start
            return out

    reference_logps, policy_logps = FrozenReference.logps, HFPolicy.logps

    def reference_batch(self, sequences, with_logits=False):
        out = reference_logps(self, sequences, with_logits)
        turn.pass_on()  # only the precompute uses a FrozenReference in this run
        return out

    def counted_logps(self, sequences, with_logits=False):
        if torch.is_grad_enabled():
            clock.tokens.append(sequences.input_ids.numel())
        return policy_logps(self, sequences, with_logits)

    pref.train.CachedReference = TimedCachedReference
    FrozenReference.logps = reference_batch
    HFPolicy.logps = counted_logps

    config = build_config(flags={
        "objective": "dpo",  # its default loss: sigmoid, beta 0.1, as TRL's
        "model": os.path.join(args.work_dir, args.model_dir),
        "dataset": [os.path.join(args.work_dir, args.pairs_file)],
        "output_dir": os.path.join(args.work_dir, f"pref-run-{os.getpid()}"),
        "device": "cpu",
        "steps": args.warmup + args.steps,
        "batch_size": args.batch_size,
        "lr": LR,
        "max_length": MAX_LENGTH,
        "max_prompt_length": MAX_PROMPT_LENGTH,
        "seed": SEED,
        "gradient_checkpointing": args.variant == "lora-gc",
        **({"lora": True, "lora_options": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}
           if args.variant in ("lora", "lora-gc") else {}),
    })
    entry = turn.now()
    pref.train.train(config, registry)
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def run_trl(args: argparse.Namespace, clock: StepClock, precompute_ref: bool, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    preload_model_code()
    after_imports = rss_mib()
    turn = clock.turn

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            start = turn.now()
            out = super()._precompute_ref_logps(*a, **k)
            clock.precompute_s += turn.now() - start
            return out

        def compute_ref_log_probs(self, *a, **k):
            out = super().compute_ref_log_probs(*a, **k)
            turn.pass_on()  # called by the precompute only
            return out

        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                clock.tokens.append(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *a, **k)

    entry = turn.now()
    model_path = os.path.join(args.work_dir, args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = load_dataset("json", data_files=os.path.join(args.work_dir, args.pairs_file), split="train")
    config = DPOConfig(
        output_dir=os.path.join(args.work_dir, f"trl-run-{os.getpid()}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute_ref,
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
    )
    trainer = TimedDPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[trl_step_clock(clock)])
    trainer.train()
    return clock.summary(entry, args.warmup, args.steps, after_imports)


def child(args: argparse.Namespace) -> None:
    use_shape(args.shape)
    go_fd, done_fd = (int(fd) for fd in args.turn_fds.split(",")) if args.turn_fds else (None, None)
    turn = Turn(go_fd, done_fd)
    turn.take()  # not even the imports run out of turn
    # a fresh cache per run, so every precompute really computes
    cache = tempfile.mkdtemp(prefix=f"cache-{args.child}-", dir=args.work_dir)
    os.environ["PREF_CACHE"] = cache
    os.environ["HF_DATASETS_CACHE"] = os.path.join(cache, "datasets")
    clock = StepClock(turn)
    if args.child == "pref":
        result = run_pref(args, clock)
    else:
        result = run_trl(args, clock, precompute_ref=args.child == "trl-precomputed", gradient_checkpointing=args.child == "trl-defaults")
    with open(args.result, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------
# The parent: build, run the children in turn, tabulate
# ---------------------------------------------------------------------------------------


def run_children(names: list[str], args: argparse.Namespace, work: str, script: str = __file__,
                 child_args: list[str] | None = None) -> dict[str, dict]:
    """Start a child per trainer (`script --child NAME ... CHILD_ARGS`; by default this script's, with its DPO arguments) and hand
    the turn round them until all have finished."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    children = {}
    for name in names:
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        if child_args is None:
            child_args = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--shape", args.shape]
        command = [sys.executable, os.path.abspath(script), "--child", name, "--work-dir", work,
                   "--result", os.path.join(work, f"{name}.json"), "--turn-fds", f"{go_read},{done_write}", *child_args]
        with open(os.path.join(work, f"{name}.log"), "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)
        children[name] = (process, go_write, done_read)

    running, ready, rounds = list(names), set(), 0
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"  {(time.perf_counter() - started) / 60:4.1f} min  {text}", file=sys.stderr, flush=True)

    while running:
        if ready.issuperset(running):
            rounds += 1  # one training step each
            if rounds == 1 or rounds % 10 == 0:
                say(f"step {rounds} of {args.warmup + args.steps}")
        for name in list(running):
            if name in ready and not ready.issuperset(running):
                continue  # set up and waiting for the others: the training steps of all run interleaved
            process, go_write, done_read = children[name]
            try:
                os.write(go_write, b"g")
                message = os.read(done_read, 1)
            except BrokenPipeError:
                message = b""
            if message == b"r":
                ready.add(name)
                say(f"{name} is set up")
            if not message:  # the child exited, holding the turn
                running.remove(name)
                os.close(go_write)
                os.close(done_read)
                say(f"{name} finished (exit {process.wait()})")

    results = {}
    for name in names:
        code = children[name][0].returncode
        if code != 0:
            with open(os.path.join(work, f"{name}.log")) as f:
                print(f"{name} failed (exit {code}); the end of its log:\n{f.read()[-3000:]}", file=sys.stderr)
            continue
        with open(os.path.join(work, f"{name}.json")) as f:
            results[name] = json.load(f)
    return results


MEMORY_RUNS = [("pref", "full"), ("trl-precomputed", "full"), ("pref", "lora"), ("pref", "lora-gc")]
MEMORY_LABELS = {("pref", "full"): "pref, full fine-tune", ("trl-precomputed", "full"): "TRL (precomputed reference), full fine-tune",
                 ("pref", "lora"): "pref, LoRA r=16 (all linear layers)", ("pref", "lora-gc"): "pref, LoRA + gradient checkpointing"}


MEMORY_PAIRS = "pairs-memory.jsonl"


def memory_table(args: argparse.Namespace, work: str) -> str:
    """Peak RSS of processes that each run `args.memory_steps` DPO steps, one at a time, per vocabulary and run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    # one batch of pairs, the same rows for every trainer (peak memory depends on the batch, not on the
    # dataset's size; a small file keeps each process's reference precompute short)
    with open(os.path.join(work, "pairs.jsonl")) as f:
        batch = [next(f) for _ in range(args.batch_size)]
    with open(os.path.join(work, MEMORY_PAIRS), "w") as f:
        f.writelines(batch)
    rows = {}
    for vocab in MEMORY_VOCABS:
        model_dir = f"model-{vocab}"
        params = build_model(os.path.join(work, model_dir), vocab)
        for name, variant in MEMORY_RUNS:
            result = os.path.join(work, f"memory-{vocab}-{name}-{variant}.json")
            command = [sys.executable, os.path.abspath(__file__), "--child", name, "--variant", variant, "--work-dir", work,
                       "--model-dir", model_dir, "--result", result, "--steps", str(args.memory_steps), "--warmup", "0", "--pairs-file", MEMORY_PAIRS,
                       "--batch-size", str(args.batch_size), "--shape", args.shape]
            print(f"  memory: vocab {vocab}, {name} {variant}", file=sys.stderr, flush=True)
            with open(os.path.join(work, f"memory-{vocab}-{name}-{variant}.log"), "w") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
            if code == 0:
                with open(result) as f:
                    rows[(vocab, name, variant)] = (params, json.load(f))
            else:
                print(f"  failed (exit {code}), see {log.name}", file=sys.stderr)
    lines = [
        "", f"## Peak memory of {args.memory_steps} DPO steps (batch {args.batch_size} pairs), by vocabulary", "",
        "Each cell is one process: load, reference precompute, then the steps; peak RSS in MiB (the RSS at the first step in brackets: "
        f"what the model, optimizer and data took before any step). Same model body; the data is the first {args.batch_size} pairs "
        "of the dataset, so every step of every process trains on the same batch.", "",
        "| vocabulary | parameters | " + " | ".join(MEMORY_LABELS[r] for r in MEMORY_RUNS) + " | pref / TRL (full) |",
        "|---:|---:|" + "---:|" * (len(MEMORY_RUNS) + 1),
    ]
    for vocab in MEMORY_VOCABS:
        cells, params = [], 0
        for name, variant in MEMORY_RUNS:
            if (vocab, name, variant) in rows:
                params, r = rows[(vocab, name, variant)]
                cells.append(f"{r['peak_rss_mib']:.0f} ({r['rss_at_first_step_mib']:.0f})")
            else:
                cells.append("failed")
        pref, trl = rows.get((vocab, "pref", "full")), rows.get((vocab, "trl-precomputed", "full"))
        ratio = f"x{pref[1]['peak_rss_mib'] / trl[1]['peak_rss_mib']:.2f}" if pref and trl else ""
        lines.append(f"| {vocab:,} | {params / 1e6:.1f}M | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def versions() -> str:
    from importlib import metadata

    names = ("pref", "trl", "transformers", "accelerate", "torch", "datasets")
    return ", ".join(f"{n} {metadata.version(n)}" for n in names)


def report(results: dict[str, dict], args: argparse.Namespace, params: int, load: tuple[float, float], minutes: float) -> str:
    lines = [
        "# DPO throughput: pref vs TRL",
        "",
        f"Machine: {machine()} on the CPU with {THREADS} threads. Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end; the run took {minutes:.1f} min.",
        f"Versions: {versions()}.",
        "",
        f"Model: Llama, {params / 1e6:.1f}M parameters (hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
        + ("the vocabulary of pref's default word-level tokenizer" if SHAPE == "small" else f"a byte-level BPE tokenizer of {BPE_VOCAB:,} tokens trained here")
        + ", untied head), fp32.",
        f"Data: {args.pairs} synthetic pairs, prompts of {PROMPT_WORDS[0]}-{PROMPT_WORDS[1]} words, completions of "
        f"{COMPLETION_WORDS[0]}-{COMPLETION_WORDS[1]} words plus EOS" + (" (one token per word)" if SHAPE == "small" else "") + f". Batch size {args.batch_size} pairs "
        f"({2 * args.batch_size} sequences per forward), lr {LR}, AdamW, gradient clipping at 1.0.",
        f"Steps/s over {args.steps} steps after {args.warmup} warm-up steps, the trainers taking turns step by step (waiting "
        "for the turn is not counted): from the median step time, which a few steps slowed by other jobs on the machine "
        "do not move, and from the mean. Setup: trainer call to first step (model load, tokenization, reference precompute). "
        "Total: setup plus all steps. CPU s/step: process CPU time (both threads) per step. Tokens/step: padded tokens "
        "in the training forward.",
        "",
        "| run | steps/s (median) | steps/s (mean) | CPU s/step | tokens/step | setup s | of which reference precompute s | total s | peak RSS MiB | RSS after imports MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if not results:  # --memory-only: the header, then the memory table
        lines = lines[:6]
    for name, r in results.items():
        lines.append(
            f"| {RUNS[name]} | {1 / r['median_step_s']:.3f} | {r['steps_per_s']:.3f} | {r['cpu_s_per_step']:.2f} | {r['tokens_per_step']:.0f} | "
            f"{r['setup_s']:.1f} | {r['precompute_s']:.1f} | {r['total_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_after_imports_mib']:.0f} |"
        )
    pref = results.get("pref")
    if pref:
        lines += ["", "pref / TRL (steps/s: above 1 means pref is faster; time and memory: below 1 means pref needs less):", ""]
        for name, r in results.items():
            if name != "pref":
                lines.append(
                    f"- vs {RUNS[name]}: steps/s x{r['median_step_s'] / pref['median_step_s']:.2f} (median), "
                    f"x{pref['steps_per_s'] / r['steps_per_s']:.2f} (mean); total time x{pref['total_s'] / r['total_s']:.2f}; "
                    f"peak RSS x{pref['peak_rss_mib'] / r['peak_rss_mib']:.2f}"
                )
    only = f" --only {' '.join(results)}" if args.only else ""
    shape = f" --shape {SHAPE}" if SHAPE != "small" else ""
    memory = f" --memory-table --memory-steps {args.memory_steps}" if args.memory_table else ""
    memory = f" --memory-only --memory-steps {args.memory_steps}" if args.memory_only else memory
    lines += ["", f"Command: `python bench/dpo_throughput.py{shape} --steps {args.steps} --warmup {args.warmup} --batch-size {args.batch_size} "
              f"--pairs {args.pairs}{' --trl-defaults' if args.trl_defaults else ''}{only}{memory}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="measured steps per trainer (default 30; realistic shape 12)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before measuring (default 5; realistic shape 2)")
    parser.add_argument("--batch-size", type=int, help="preference pairs per step (default 8; realistic shape 4)")
    parser.add_argument("--pairs", type=int, help="synthetic pairs in the dataset (default 512; realistic shape 256)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these (default: pref, trl, trl-precomputed)")
    parser.add_argument("--trl-defaults", action="store_true", help="also run TRL with gradient checkpointing on, its default")
    parser.add_argument("--work-dir", help="keep the model, data and logs here instead of a temporary folder")
    parser.add_argument("--shape", choices=["small", "realistic"], default="small",
                        help="small: 10M Llama, word-level 4k vocabulary (default); realistic: 36M Llama, 16k BPE, uneven lengths")
    parser.add_argument("--memory-table", action="store_true", help="also measure peak memory at vocabularies of 16k, 64k and 151k")
    parser.add_argument("--memory-steps", type=int, default=2, help="DPO steps per memory-table process (default 2)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table (implies --memory-table)")
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", default="pairs.jsonl", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["full", "lora", "lora-gc"], default="full", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # the realistic shape's steps are ~10x the small one's: fewer of them keep the whole run near 15 minutes on 2 cores
    defaults = dict(steps=30, warmup=5, batch_size=8, pairs=512) if args.shape == "small" else dict(steps=12, warmup=2, batch_size=4, pairs=256)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        child(args)
        return

    use_shape(args.shape)
    started, load = time.perf_counter(), os.getloadavg()[0]
    work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="pref-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        params = build_model(os.path.join(work, "model"))
        build_pairs(os.path.join(work, "pairs.jsonl"), os.path.join(work, "model"), args.pairs)
        default = ["pref", "trl", "trl-precomputed"] if SHAPE == "small" else ["pref", "trl-precomputed"]  # realistic: like for like only
        names = args.only or default + (["trl-defaults"] if args.trl_defaults else [])
        if not args.memory_only:
            print(f"running {', '.join(names)} in turns; logs in {work}", file=sys.stderr, flush=True)
        results = {} if args.memory_only else run_children(names, args, work)
        memory = memory_table(args, work) if args.memory_table or args.memory_only else ""
        text = report(results, args, params, (load, os.getloadavg()[0]), (time.perf_counter() - started) / 60) + memory
        print(text)
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        path = RESULTS if SHAPE == "small" else RESULTS.replace(".md", "_realistic.md")
        with open(path.replace(".md", "_memory.md") if args.memory_only else path, "w") as f:
            f.write(text)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
