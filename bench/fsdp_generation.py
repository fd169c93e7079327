"""Sampling through a sharded (FSDP2) model: weights gathered once per `generate` call, or at every new token.

    accelerate launch --num_processes 2 bench/fsdp_generation.py [--layers 8] [--hidden 512] [--vocab 16384]
        [--prompts 4] [--samples 2] [--new-tokens 32] [--repeats 3]

Every process builds the same randomly initialised Llama (seeded), pref shards it as `pref run --fsdp`
does (`pref.sharding.shard`), and each process samples `--samples` answers to `--prompts` prompts of its
own through `HFPolicy.sample`, the call online objectives and `--test-prompt` make. Two ways, taking turns:

- `gathered`: as pref samples (`gathered_for_generation`): each layer's weights are gathered at the
  first forward and kept until the call ends;
- `per token`: the same call with that context left out: FSDP2's default, each layer gathered again at
  every forward, that is at every new token.

Printed, on process 0: all-gathers per call (counted by wrapping `torch.distributed.all_gather_single`,
which FSDP2 calls), seconds per
call (median of `--repeats`), and whether both ways sampled the same ids (the same seed before each call).
On CPU processes (gloo) a gather is a memory copy between processes, so this understates what gathers
cost between GPUs; the count is the same there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in [("layers", 8), ("hidden", 512), ("vocab", 16384), ("prompts", 4), ("samples", 2), ("new-tokens", 32), ("repeats", 3)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()

    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    import pref.policy
    from pref.interfaces import SamplingConfig
    from pref.policy import HFPolicy
    from pref.sharding import gathered_for_generation, shard

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")), bos_token="t1", eos_token="t2",
                                        pad_token="t0", unk_token="t3")
    shard(model, torch.float32)
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
    results = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for way, context in [("gathered", gathered_for_generation), ("per token", lambda model: nullcontext())]:
            pref.policy.gathered_for_generation = context
            torch.manual_seed(1000 + repeat)
            gathers["n"] = 0
            dist.barrier()
            start = time.perf_counter()
            samples = policy.sample(prompts, args.samples, sampling)
            dist.barrier()
            seconds = time.perf_counter() - start
            entry = results.setdefault(way, {"seconds": [], "gathers": gathers["n"], "ids": []})
            if repeat:
                entry["seconds"].append(seconds)
            entry["ids"].append(samples.sequences.input_ids.tolist())
    if rank == 0:
        same = results["gathered"]["ids"] == results["per token"]["ids"]
        print(f"{args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}; {accelerator.num_processes} processes, "
              f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens per process")
        print("| way | all-gathers per call | seconds per call (median) |")
        print("|---|---:|---:|")
        for way, entry in results.items():
            print(f"| {way} | {entry['gathers']} | {statistics.median(entry['seconds']):.3f} |")
        print(f"same sampled ids both ways: {same}")
    dist.barrier()


if __name__ == "__main__":
    main()
