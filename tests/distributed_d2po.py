"""Run by `tests/test_distributed.py` in two processes under `accelerate launch` (main, through distributed_runs.py): a short D2PO run.

Usage: distributed_d2po.py MODEL DEVICE OUT_DIR REPORT_DIR

Each process writes `weights-rank<k>.json` to REPORT_DIR: the `weights_hash` of the
policy and of the discriminator it holds after training, and its gold pairs.
"""

import json
import os
import sys

from distributed_train import weights_hash  # tests/ is on sys.path

STEPS = 3


def main(model: str, device: str, out_dir: str, report_dir: str) -> None:
    from accelerate import PartialState

    from pref.config import build_config
    from pref.registry import load_registry
    from pref.train import train_policy

    flags = {
        "objective": "d2po", "model": model, "steps": STEPS, "batch_size": 2, "max_new_tokens": 6, "device": device,
        "save_every": 2, "output_dir": out_dir, "seed": 0, "max_length": 64,
        "objective_options": {"round_size": 4, "budget": 2, "disc_batch_size": 2, "gold": "bag-of-words",
                              "gold_options": {"words": ["the", "is"]}},
    }
    registry = load_registry()
    objective_seen = []
    original = registry.create

    def create(kind, name, options=None, **context):  # keep the objective to read its discriminator afterwards
        item = original(kind, name, options, **context)
        if kind == "objective":
            objective_seen.append(item)
        return item

    registry.create = create
    _, policy = train_policy(build_config(flags=flags), registry)
    [objective] = objective_seen
    rank = PartialState().process_index
    os.makedirs(report_dir, exist_ok=True)
    report = {
        "policy": weights_hash(policy.model),
        "discriminator": weights_hash(objective.discriminator.model),
        "gold_pairs": len(objective.discriminator.gold_pairs),
        "own_gold_pairs": len(objective.relabeler.gold_pairs),  # labelled by this process
    }
    with open(os.path.join(report_dir, f"weights-rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main(*sys.argv[1:])
