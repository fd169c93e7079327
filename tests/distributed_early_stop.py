"""Run by `tests/test_distributed.py` in two processes under `accelerate launch` (main, through distributed_runs.py): an online DPO run that stops early.

Usage: distributed_early_stop.py MODEL HELD_OUT DEVICE OUT_DIR REPORT_DIR

Its reward scores the first step's samples by position and every later sample the same, so the
run stops after step 1 and evaluates the model it ends with (held-out NLL, a test prompt).
Each process writes `weights-rank<k>.txt` to REPORT_DIR: the `weights_hash` of the model it ends with.
"""

import os
import sys

import torch

STEPS = 3


def main(model: str, held_out: str, device: str, out_dir: str, report_dir: str) -> None:
    from accelerate import PartialState

    from pref.config import build_config
    from pref.hookspecs import hookimpl
    from pref.interfaces import RewardSource
    from pref.online import OnlineBatches
    from pref.registry import Registry, get_plugin_manager
    from pref.train import train_policy

    from distributed_train import weights_hash  # tests/ is on sys.path

    class IndexedThenConstant(RewardSource):
        default_prompts = ["Say one word.", "Say another word."]

        def __init__(self):
            self.calls = 0

        def score(self, prompts, completions):
            self.calls += 1
            scores = torch.arange(len(completions), dtype=torch.float32)
            return {"reward": scores if self.calls == 1 else torch.zeros_like(scores)}

    class Plugin:
        @hookimpl
        def register_rewards(self, register):
            register("indexed-then-constant", IndexedThenConstant)

    max_draws, OnlineBatches.MAX_DRAWS = OnlineBatches.MAX_DRAWS, 2  # give up on the all-equal pools quickly
    pm, failures, sources = get_plugin_manager()
    pm.register(Plugin(), name="test-indexed-then-constant")
    flags = {
        "objective": "online-dpo", "reward": "indexed-then-constant", "model": model, "steps": STEPS, "batch_size": 2,
        "samples_per_prompt": 2, "max_new_tokens": 4, "device": device, "output_dir": out_dir, "seed": 0, "max_length": 64,
        "validation_dataset": [held_out], "test_prompts": ["Name a fruit."],
    }
    try:
        _, policy = train_policy(build_config(flags=flags), Registry(pm, failures, sources))
    finally:
        OnlineBatches.MAX_DRAWS = max_draws  # for the jobs run after this one in the process (see distributed_runs.py)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"weights-rank{PartialState().process_index}.txt"), "w") as f:
        f.write(weights_hash(policy.model))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(*sys.argv[1:])
