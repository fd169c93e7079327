"""Every process of a multi-process run reaches the same decision when one of them must stop: no hang."""

import json
import os
import sys

import pytest

from distributed_runs import free_port  # tests/ is on sys.path

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_agreement.py")


@pytest.mark.slow
def test_one_failing_process_stops_all_of_them_the_same_way(tmp_path):
    import subprocess

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT, str(tmp_path)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert done.returncode == 0, done.stderr[-4000:]
    outcomes = [json.loads((tmp_path / f"outcome-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]  # the same exception and message on both
    assert outcomes[0] == {
        "no pairs on one process": ["NoUsablePairs", "rank 1 has no pair"],
        "user error on one process": ["PrefError", "rank 1 is unhappy"],
        "nan sampling on one process": ["PrefError", "diverged (1)"],
        "nan loss on one process": outcomes[0]["nan loss on one process"],
        "all well": ["ok", ""],
    }
    kind, message = outcomes[0]["nan loss on one process"]
    assert kind == "PrefError" and message.startswith("training diverged at step 7: loss nan")
