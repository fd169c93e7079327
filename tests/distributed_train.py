"""Run by `tests/test_distributed.py` in two processes under `accelerate launch` (main, through distributed_runs.py): a short DPO run.

Usage: distributed_train.py MODEL PREFS DEVICE OUT_DIR REPORT_DIR

Each process writes to REPORT_DIR:
- `weights-rank<k>.txt`: `weights_hash` of the model it holds after training;
- `seen-rank<k>.json`: per step, the chosen completions it trained on, its own loss and its batch's real tokens.
"""

import hashlib
import json
import os
import sys

import torch

STEPS = 3
BATCH_SIZE = 2  # per process
SAVE_EVERY = 2


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry (name and raw bytes), in sorted key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recording_plugin(seen: list[dict]) -> object:
    """A throw-away plugin: DPO that notes each batch it is given, as `recording-dpo`."""
    from pref.hookspecs import hookimpl
    from pref.plugins.dpo import DPO

    class RecordingDPO(DPO):
        def loss(self, policy, reference, batch):
            loss, metrics = super().loss(policy, reference, batch)
            chosen = batch.chosen
            rows = [ids[mask.bool()].tolist() for ids, mask in zip(chosen.input_ids, chosen.completion_mask)]
            texts = policy.tokenizer.batch_decode(rows, skip_special_tokens=True)
            tokens = int(chosen.attention_mask.sum() + batch.rejected.attention_mask.sum())
            seen.append({"chosen": [t.strip() for t in texts], "loss": loss.item(), "tokens": tokens})
            return loss, metrics

    class Plugin:
        @hookimpl
        def register_objectives(self, register):
            register("recording-dpo", RecordingDPO)

    return Plugin()


def main(model: str, prefs: str, device: str, out_dir: str, report_dir: str) -> None:
    from pref.config import build_config
    from pref.registry import Registry, get_plugin_manager
    from pref.train import train_policy

    seen: list[dict] = []
    pm, failures, sources = get_plugin_manager()
    pm.register(recording_plugin(seen), name="recording")
    flags = {
        "objective": "recording-dpo",
        "model": model,
        "dataset": [prefs],
        "output_dir": out_dir,
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "save_every": SAVE_EVERY,
        "seed": 0,
        "device": device,
        "max_length": 64,
    }
    _, policy = train_policy(build_config(flags=flags), Registry(pm, failures, sources))

    from accelerate import PartialState

    rank = PartialState().process_index
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"weights-rank{rank}.txt"), "w") as f:
        f.write(weights_hash(policy.model))
    with open(os.path.join(report_dir, f"seen-rank{rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
