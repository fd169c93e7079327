"""FSDP2 (torch's `fully_shard`) on two CPU processes with gloo: pref's lean log-probs train the same
weights sharded as unsharded, and a sharded checkpoint resumes exactly.

accelerate 1.15 does not turn FSDP on for CPU processes (its FSDP switch only applies to
multi-GPU-like devices), so pref's `accelerate launch` path is not tested with FSDP here;
this test covers what runs on CPUs: sharding, the LM head called outside the sharded
model's forward (the lean log-probs), the full state dict gathered for `final/`, and
`torch.distributed.checkpoint` save and resume.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from fsdp2_train import SAVE_AT, global_batch, loss_of, make_optimizer  # tests/ is on sys.path

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp2_train.py")
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.dirname(__file__)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes_exactly(tiny_model_dir, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(tiny_model_dir, str(whole), str(STEPS))
    sharded = torch.load(whole / "final.pt")

    # the same steps in one unsharded process: the mean of the two halves' losses
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optimizer = make_optimizer(model)
    batch = global_batch(tiny_model_dir)
    halves = [batch.select([0, 1]), batch.select([2, 3])]
    for _ in range(STEPS):
        loss = sum(loss_of(model, half) for half in halves) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plain = model.state_dict()
    assert sharded.keys() <= plain.keys()
    for key, value in sharded.items():
        torch.testing.assert_close(value, plain[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    assert any(not torch.equal(value, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[key]) for key, value in sharded.items())

    # stop after the checkpoint at step SAVE_AT, then resume from it: the same weights, bit for bit
    launch(tiny_model_dir, str(resumed), str(SAVE_AT + 1))
    launch(tiny_model_dir, str(resumed), str(STEPS), str(SAVE_AT))
    again = torch.load(resumed / "final.pt")
    for key in sharded:
        assert torch.equal(sharded[key], again[key]), key
