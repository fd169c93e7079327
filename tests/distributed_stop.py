"""Run by `tests/test_distributed.py` in two processes under `accelerate launch` (main, through distributed_runs.py): the DPO run
of distributed_train.py, stopped by a SIGTERM that only process 1 receives, then resumed.

Usage: distributed_stop.py MODEL PREFS DEVICE OUT_DIR REPORT_DIR

Process 1 sends itself SIGTERM during step 1. Each process writes `stop-rank<k>.json` to REPORT_DIR: the message and exit code
of the `RunInterrupted` it met, and the `weights_hash` of the model it holds once the run has gone on to its end.
"""

import json
import os
import signal
import sys


def main(model: str, prefs: str, device: str, out_dir: str, report_dir: str) -> None:
    from accelerate import PartialState

    from pref.config import build_config
    from pref.errors import RunInterrupted
    from pref.hookspecs import hookimpl
    from pref.plugins.dpo import DPO
    from pref.registry import Registry, get_plugin_manager
    from pref.train import train_policy

    from distributed_train import BATCH_SIZE, SAVE_EVERY, STEPS, weights_hash  # tests/ is on sys.path

    class SignalledDPO(DPO):
        sent = False

        def loss(self, policy, reference, batch):
            if PartialState().process_index == 1 and not SignalledDPO.sent:
                SignalledDPO.sent = True
                signal.raise_signal(signal.SIGTERM)
            return super().loss(policy, reference, batch)

    class Plugin:
        @hookimpl
        def register_objectives(self, register):
            register("signalled-dpo", SignalledDPO)

    pm, failures, sources = get_plugin_manager()
    pm.register(Plugin(), name="signalled")
    flags = {"objective": "signalled-dpo", "model": model, "dataset": [prefs], "output_dir": out_dir, "steps": STEPS,
             "batch_size": BATCH_SIZE, "save_every": SAVE_EVERY, "seed": 0, "device": device, "max_length": 64}
    report = {}
    try:
        train_policy(build_config(flags=flags), Registry(pm, failures, sources))
    except RunInterrupted as exc:
        report.update(message=str(exc), exit_code=exc.exit_code)
    _, policy = train_policy(build_config(flags={**flags, "resume": out_dir}), Registry(pm, failures, sources))
    report["weights"] = weights_hash(policy.model)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"stop-rank{PartialState().process_index}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
