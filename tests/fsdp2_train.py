"""Launched by `tests/test_fsdp2.py` under torch's launcher (two CPU processes, gloo): FSDP2 training steps.

Usage: fsdp2_train.py MODEL OUT_DIR STEPS [RESUME_FROM_STEP]

Each decoder layer and then the whole model are sharded with torch's `fully_shard` (FSDP2);
each step scores this process's half of a fixed global batch with pref's lean log-probs
(`pref.sequences.model_logps`, the LM head called outside the model's own forward) and takes
an AdamW step. After step `SAVE_AT` the sharded model and optimizer are saved with
`torch.distributed.checkpoint`; with RESUME_FROM_STEP the run loads them and continues. Rank 0
writes the full (gathered) state dict to OUT_DIR/final.pt.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from pref.policy import HFPolicy

PROMPTS = ["Name a fruit.", "What is your name?", "Say something kind.", "Name an animal."]
ANSWERS = ["apple", "i am pref , a helpful assistant .", "you are a good friend .", "dog"]
LR = 1e-2
SAVE_AT = 2  # the step after which the sharded checkpoint is written


def make_optimizer(model):
    """AdamW with a large eps: Adam divides tiny gradients by their own size, which turns the rounding
    differences of a sharded reduction into visible ones; eps keeps the comparison about the sharding."""
    return torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-4)


def global_batch(model_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = HFPolicy(None, tokenizer)
    return policy.encode(PROMPTS, ANSWERS)


def loss_of(model, sequences):
    """Mean negative log-likelihood of the answers, through pref's lean log-probs."""
    return -model_logps(model, sequences).mean.mean()


from pref.sequences import model_logps  # noqa: E402


def main() -> None:
    model_dir, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume_from = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = make_optimizer(model)
    batch = global_batch(model_dir)
    share = batch.select(list(range(rank * len(batch) // world, (rank + 1) * len(batch) // world)))
    checkpoint = os.path.join(out_dir, "checkpoint")
    if resume_from:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for step in range(resume_from + 1, steps + 1):
        loss = loss_of(model, share)
        loss.backward()  # FSDP2 reduce-scatters the mean gradient over the processes
        optimizer.step()
        optimizer.zero_grad()
        if step == SAVE_AT and not resume_from:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "final.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
