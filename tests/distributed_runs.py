"""Launched by tests under `accelerate launch`: several `pref` commands in a row in the same processes.

Usage: distributed_runs.py PLAN.json

PLAN.json is a list of steps, which every process takes in order:
- a list of strings: the arguments of one `pref` command (`["run", "--objective", "dpo", ...]`), which must succeed;
- `{"main": MODULE, "args": [...]}`: `main(*args)` of the script MODULE in tests/ (such as distributed_train.py);
- `{"cache": [DIR0, DIR1]}`: each process's PREF_CACHE from now on (process 0's first): one can find the reference's
  log-probs cached where the other computes them;
- `{"copy": SRC, "to": DST}`: process 0 copies the run folder SRC to DST without its final/ (a run stopped after
  its last checkpoint) while the others wait; only after a run, whose accelerator has joined the processes.

Every launched process pays the imports of torch and transformers first (~10 s on 2 cores): a test that needs
several runs pays them once this way. Each run seeds every process and resets accelerate's state itself, so it
trains as it would in a process of its own (the tests that use this compare runs bit for bit, which checks it).
"""

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(plan: list, cache: str, folder) -> subprocess.CompletedProcess:
    """`accelerate launch` two CPU processes of this script, which take the steps of `plan`; no config file needed.

    `folder` (a pathlib.Path) receives the plan's file and a fresh HF_HOME: no accelerate config file of the user's is read.
    """
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps(plan))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), __file__, str(plan_file)]
    env = {**os.environ, "PREF_CACHE": str(cache), "HF_HOME": str(folder / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return run_whole_group(command, env, timeout=300)


def run_whole_group(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)`, but a command that overruns `timeout` seconds (a hang) is
    killed with every process it started (`accelerate launch`'s workers, each in a session of its own, would outlive the
    launcher and hold its output open), and fails the test with the end of its stderr."""
    import psutil  # accelerate's own dependency

    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher = psutil.Process(process.pid)
            for started in [*launcher.children(recursive=True), launcher]:  # found before any is killed and the others move away
                started.kill()
            stderr = process.communicate()[1]
            raise AssertionError(f"{command[-1]} ran over {timeout} s (a hang?) and was killed; its stderr ended with:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def main(plan_file: str) -> None:
    import atexit

    import torch.distributed as dist

    from pref.cli.main import cli

    atexit.register(parted)  # the first registered runs last: after pref's own exit handlers

    with open(plan_file, encoding="utf-8") as f:
        plan = json.load(f)
    for step in plan:
        if isinstance(step, dict) and "main" in step:
            importlib.import_module(step["main"]).main(*step["args"])
        elif isinstance(step, dict) and "cache" in step:
            os.environ["PREF_CACHE"] = step["cache"][dist.get_rank()]
        elif isinstance(step, dict):
            if dist.get_rank() == 0:
                shutil.copytree(step["copy"], step["to"])
                shutil.rmtree(os.path.join(step["to"], "final"))
            dist.barrier()
        else:
            cli(step, prog_name="pref", standalone_mode=False)  # a failure exits the process (a PrefError: with 2)


def parted() -> None:
    """Fail the process if pref left it in the process group it joined (gloo's threads may then abort the exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        print("pref left the process group joined at exit", file=sys.stderr, flush=True)
        os._exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])
