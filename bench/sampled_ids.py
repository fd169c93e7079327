"""How often re-encoding a sampled answer's text gives other token ids than the ones sampled, and why.

    python bench/sampled_ids.py [--model PATH ...] [--samples-per-prompt K] [--rounds N] [--results PATH]

Online objectives once trained on `policy.encode(prompt, text)`, the sampled answer decoded
(special tokens skipped, whitespace stripped) and tokenized again, plus one EOS. This script
samples with `HFPolicy.sample` (the ids the model drew, up to and including the EOS it
emitted) and compares each sample's completion ids with that re-encoding. A sample that
differs is counted under every cause that applies:

- `no EOS`: it stopped at `max_new_tokens`; the re-encoding ends with an EOS it never sampled;
- `special`: special tokens inside the answer, dropped by the decoding;
- `strip`: whitespace at either end of the decoded text, stripped;
- `BPE`: the tokenizer splits the decoded text otherwise than the model sampled it
  (a non-canonical split: re-encoding the unstripped text still differs).

Models: `pref-default` (the embedded default, 8,192-token byte-level BPE, chat template) and
`random-bpe16k`, a randomly initialised small Llama over the 16,384-token byte-level BPE
tokenizer of `bench/dpo_throughput.py` (plain-text prompts); a random model draws tokens
nearly uniformly, the worst case. `--model PATH` adds more (a run's `final/`). Prompts are the
noun-diversity reward's 8; max_new_tokens 8 (that reward's, the default run's) and 32 (pref's
default); temperature 1; seed 0, so the counts do not depend on the machine's load. The table
goes to stdout and to bench/results/sampled_ids.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

import torch

from machine import machine  # bench/machine.py (bench/ is on sys.path when a script runs)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "sampled_ids.md")
MAX_NEW_TOKENS = (8, 32)
CAUSES = ("no EOS", "special", "strip", "BPE")


def random_bpe_model(folder: str) -> str:
    """A random small Llama over a 16k byte-level BPE tokenizer, saved into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_throughput import BPE_VOCAB, build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer(BPE_VOCAB)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def causes(tokenizer, sampled: list[int]) -> set[str]:
    """Why re-encoding the text of `sampled` (completion ids, EOS included if emitted) may not give it back."""
    eos = tokenizer.eos_token_id
    body = sampled[:-1] if sampled and sampled[-1] == eos else sampled
    text = tokenizer.decode(body, skip_special_tokens=True)
    found = set()
    if not sampled or sampled[-1] != eos:
        found.add("no EOS")
    if tokenizer.decode(body, skip_special_tokens=False) != text:
        found.add("special")
    if text != text.strip():
        found.add("strip")
    if not found & {"special"} and tokenizer(text, add_special_tokens=False)["input_ids"] != body:
        found.add("BPE")
    return found


def measure(path: str | None, k: int, rounds: int, max_new_tokens: int) -> dict:
    """Sample `rounds` x 8 prompts x `k` answers and compare their ids with the re-encoded text's."""
    from pref.interfaces import SamplingConfig
    from pref.plugins.noun_diversity import NounDiversityReward
    from pref.policy import HFPolicy

    policy = HFPolicy.load(path)
    prompts = list(NounDiversityReward.default_prompts)
    torch.manual_seed(0)
    total, differ, counted = 0, 0, Counter()
    for _ in range(rounds):
        samples = policy.sample(prompts, k, SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0))
        flat_prompts = [p for p, row in zip(prompts, samples.completions) for _ in row]
        flat = [c for row in samples.completions for c in row]
        encoded = policy.encode(flat_prompts, flat)
        for row in range(len(flat)):
            sampled = samples.sequences.input_ids[row][samples.sequences.completion_mask[row].bool()].tolist()
            again = encoded.input_ids[row][encoded.completion_mask[row].bool()].tolist()
            total += 1
            if sampled != again:
                differ += 1
                counted.update(causes(policy.tokenizer, sampled) or {"other"})
    return {"total": total, "differ": differ, **counted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="another model to measure (repeatable)")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="batches of 8 prompts x K samples per model and setting")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Sampled token ids against the re-encoded text", "",
        f"`python bench/sampled_ids.py` ({machine()}): {args.rounds} x 8 prompts x {args.samples_per_prompt} samples per row, seed 0.",
        "A sample is counted under every cause that applies (see the script's docstring).", "",
        "| model | max_new_tokens | samples | re-encoded ids differ | " + " | ".join(CAUSES) + " | other |",
        "|---|---|---|---|" + "---|" * (len(CAUSES) + 1),
    ]
    with tempfile.TemporaryDirectory() as folder:
        models = [("pref-default", None), ("random-bpe16k", random_bpe_model(folder))] + [(m, m) for m in args.model]
        for name, path in models:
            for max_new_tokens in MAX_NEW_TOKENS:
                found = measure(path, args.samples_per_prompt, args.rounds, max_new_tokens)
                share = f"{found['differ']} ({found['differ'] / found['total']:.1%})"
                lines.append(f"| {name} | {max_new_tokens} | {found['total']} | {share} | "
                             + " | ".join(str(found.get(c, 0)) for c in (*CAUSES, "other")) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
