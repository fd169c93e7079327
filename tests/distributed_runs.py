"""Launched by tests under `accelerate launch`: several `pref` commands in a row in the same processes.

Usage: distributed_runs.py PLAN.json

PLAN.json is a list of steps, which every process takes in order:
- a list of strings: the arguments of one `pref` command (`["run", "--objective", "dpo", ...]`), which must succeed;
- `{"copy": SRC, "to": DST}`: process 0 copies the run folder SRC to DST without its final/ (a run stopped after
  its last checkpoint) while the others wait; only after a run, whose accelerator has joined the processes.

Every launched process pays the imports of torch and transformers first (~10 s on 2 cores): a test that needs
several runs pays them once this way. Each run seeds every process and resets accelerate's state itself, so it
trains as it would in a process of its own (the tests that use this compare runs bit for bit, which checks it).
"""

import json
import os
import shutil
import sys


def main(plan_file: str) -> None:
    import torch.distributed as dist

    from pref.cli.main import cli

    with open(plan_file, encoding="utf-8") as f:
        plan = json.load(f)
    for step in plan:
        if isinstance(step, dict):
            if dist.get_rank() == 0:
                shutil.copytree(step["copy"], step["to"])
                shutil.rmtree(os.path.join(step["to"], "final"))
            dist.barrier()
        else:
            cli(step, prog_name="pref", standalone_mode=False)  # a failure exits the process (a PrefError: with 2)


if __name__ == "__main__":
    main(*sys.argv[1:])
