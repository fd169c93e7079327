"""Sampling through a sharded (FSDP2) model, and the frozen reference's memory, under `--fsdp`.

    accelerate launch --num_processes 2 bench/fsdp_generation.py [--layers 8] [--hidden 512] [--vocab 16384]
        [--prompts 4] [--samples 2] [--new-tokens 32] [--repeats 3]

Every process builds the same randomly initialised Llama (seeded), takes a frozen copy of it as
`--reference model` does, and pref shards both as `pref run --fsdp` does (`pref.sharding.shard`,
`FrozenReference.shard`). Each process then samples `--samples` answers to `--prompts` prompts of its
own through `HFPolicy.sample`, the call online objectives and `--test-prompt` make. Two ways, taking turns:

- `gathered` (the default): each layer's weights are gathered at the first forward and kept until the
  call ends (`gathered_for_generation`);
- `layer by layer` (`--sample-sharded`): FSDP2's default, each layer gathered again at each forward,
  that is at every new token, and freed after it.

Printed, on process 0: all-gathers per call (counted by wrapping `torch.distributed.all_gather_single`,
which FSDP2 calls), seconds per call (median of `--repeats`), the most parameter bytes a process held
during a call (its shards plus every weight gathered whole at that moment, read at each layer's forward;
parameters only, not activations, KV cache or RSS, so the figure means the same on CPU and GPU), and
whether both ways sampled the same ids (the same seed before each call). Then, per process, the frozen
reference's parameter bytes whole and sharded, and the largest difference between the two's log-probs
of the sampled rows. On CPU processes (gloo) a gather is a memory copy between processes, so this
understates what gathers cost between GPUs; the counts and bytes are the same there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes of `model`'s parameters this process holds: a sharded one's local pieces, a gathered one's whole tensors."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def gathered_bytes(model: torch.nn.Module) -> int:
    """The bytes of `model`'s parameters gathered whole right now (FSDP2 puts plain tensors in place of the shards)."""
    from torch.distributed.tensor import DTensor

    return sum(p.nbytes for p in model.parameters() if not isinstance(p, DTensor))


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in [("layers", 8), ("hidden", 512), ("vocab", 16384), ("prompts", 4), ("samples", 2), ("new-tokens", 32), ("repeats", 3)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()

    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from pref.interfaces import SamplingConfig
    from pref.policy import HFPolicy
    from pref.reference import FrozenReference
    from pref.sharding import shard

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")), bos_token="t1", eos_token="t2",
                                        pad_token="t0", unk_token="t3")
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]  # before FSDP2 renames their classes
    whole_reference = FrozenReference.copy_of(model)
    reference = FrozenReference.copy_of(model)
    reference_bytes = {"whole": parameter_bytes(reference.model)}
    shard(model, torch.float32)
    reference.shard(torch.float32)
    reference_bytes["sharded"] = parameter_bytes(reference.model)
    policy = HFPolicy(model, tokenizer, max_prompt_length=64)
    prompts = [" ".join(f"t{(rank * 97 + p * 13 + i) % args.vocab}" for i in range(16 + 4 * p)) for p in range(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)

    gathers = {"n": 0}

    def counting(collective):
        def counted(*a, **k):
            gathers["n"] += 1
            return collective(*a, **k)

        return counted

    # FSDP2 gathers through dist.all_gather_single (torch 2.13), looked up at each call
    dist.all_gather_single = counting(dist.all_gather_single)
    dist.all_gather_into_tensor = counting(dist.all_gather_into_tensor)
    # read what is held at each layer's forward and the LM head's, after FSDP2's own pre-forward hook gathered what it needs
    shards, held = parameter_bytes(model), {"peak": 0}

    def note_held(module, inputs):
        held["peak"] = max(held["peak"], shards + gathered_bytes(model))

    for module in [*layers, model.get_output_embeddings()]:
        module.register_forward_pre_hook(note_held)
    results = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for way, sample_sharded in [("gathered", False), ("layer by layer (--sample-sharded)", True)]:
            policy.sample_sharded = sample_sharded
            torch.manual_seed(1000 + repeat)
            gathers["n"], held["peak"] = 0, 0
            dist.barrier()
            start = time.perf_counter()
            samples = policy.sample(prompts, args.samples, sampling)
            dist.barrier()
            seconds = time.perf_counter() - start
            entry = results.setdefault(way, {"seconds": [], "gathers": gathers["n"], "peak": held["peak"], "ids": []})
            if repeat:
                entry["seconds"].append(seconds)
            entry["ids"].append(samples.sequences.input_ids.tolist())
            entry["after"] = gathered_bytes(model)
    # the sharded reference against the whole copy, on this process's sampled rows (every process calls it: a collective)
    rows = samples.sequences
    difference = float((reference.logps(rows).tokens - whole_reference.logps(rows).tokens).abs().max())
    reference_figures = accelerator.gather_for_metrics([(rank, reference_bytes["whole"], reference_bytes["sharded"], difference,
                                                        gathered_bytes(reference.model))], use_gather_object=True)
    mib = 2**20
    if rank == 0:
        same = results["gathered"]["ids"] == results["layer by layer (--sample-sharded)"]["ids"]
        print(f"{args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}, float32: {shards * accelerator.num_processes / mib:.1f} MiB "
              f"of parameters; {accelerator.num_processes} processes, {args.prompts} prompts x {args.samples} samples x {args.new_tokens} "
              "new tokens per process")
        print("| way | all-gathers per call | seconds per call (median) | most parameter MiB held by process 0 during a call |")
        print("|---|---:|---:|---:|")
        for way, entry in results.items():
            print(f"| {way} | {entry['gathers']} | {statistics.median(entry['seconds']):.3f} | {entry['peak'] / mib:.1f} |")
        print(f"same sampled ids both ways: {same}; parameters left gathered after the calls: "
              f"{max(entry['after'] for entry in results.values())} bytes")
        print("| process | reference parameter MiB, whole copy | sharded | largest log-prob difference | left gathered after a forward |")
        print("|---|---:|---:|---:|---:|")
        for process, whole, sharded, diff, left in reference_figures:
            print(f"| {process} | {whole / mib:.1f} | {sharded / mib:.1f} | {diff:.2g} | {left} bytes |")
    dist.barrier()
    accelerator.end_training()  # leaves the process group: left to the interpreter's exit, gloo's threads may abort it


if __name__ == "__main__":
    main()
