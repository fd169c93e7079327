"""Every process of a multi-process run reaches the same decision when one of them must stop: no hang."""

import json
import os
import sys

import pytest

from distributed_runs import free_port, run_whole_group  # tests/ is on sys.path

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_agreement.py")


@pytest.mark.slow
def test_one_failing_process_stops_all_of_them_the_same_way(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT, str(tmp_path)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    done = run_whole_group(command, env, timeout=240)  # a hang fails here
    assert done.returncode == 0, done.stderr[-4000:]
    outcomes = [json.loads((tmp_path / f"outcome-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]  # the same exception and message on both
    assert outcomes[0] == {
        "no pairs on one process": ["NoUsablePairs", "rank 1 has no pair"],
        "user error on one process": ["PrefError", "rank 1 is unhappy"],
        "nan sampling on one process": ["PrefError", "diverged (1)"],
        "nan loss on one process": outcomes[0]["nan loss on one process"],
        "a reward error on one process, drawing together": ["PrefError", "rank 1's reward failed"],
        "all well": ["ok", ""],
    }
    kind, message = outcomes[0]["nan loss on one process"]
    assert kind == "PrefError" and message.startswith("training diverged at step 7: loss nan")


def test_a_launch_that_overruns_its_time_is_killed_with_the_processes_it_started(tmp_path):
    import time

    pid_file = tmp_path / "worker.pid"
    # a launcher whose worker (its child, in a session of its own as torch's elastic agent starts them) would sleep on
    worker = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); time.sleep(60)"
    began = time.monotonic()
    with pytest.raises(AssertionError, match="ran over 3 s"):
        run_whole_group([sys.executable, "-c", launcher], dict(os.environ), timeout=3)
    assert time.monotonic() - began < 30  # not waiting on the output pipe the worker holds until it ends (60 s)
    pid = int(pid_file.read_text())
    for _ in range(50):  # killed, it may stay a zombie until its new parent reaps it
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the launched worker {pid} outlived the launch")
