"""GRPO's batch-scaled advantages and dapo normaliser, and RLOO's normalised advantages, across processes.

Two processes are simulated by two threads sharing an in-memory `Processes` (gather and mean
meet at a barrier, as the collective calls of the loop's `AcceleratedProcesses` do). Each
takes one half of a rollout; their values must be those of one process on the whole rollout,
and the average of their losses (what DDP's averaged gradients follow) the one process's loss.
"""

import threading

import pytest
import torch

from pref.interfaces import Processes, ScoredBatch
from pref.plugins.grpo import GRPO, grpo_loss
from pref.plugins.rloo import leave_one_out_advantages
from pref.sequences import Sequences


class ThreadProcesses(Processes):
    """Process `rank` of `world` threads; every reduction waits for all of them."""

    def __init__(self, rank: int, world: int, board: dict):
        self.rank, self.world, self.board = rank, world, board

    def _exchange(self, value):
        self.board["slots"][self.rank] = value
        self.board["barrier"].wait()
        values = list(self.board["slots"])
        self.board["barrier"].wait()  # nobody overwrites a slot before all have read
        return values

    def gather(self, items):
        return [item for part in self._exchange(list(items)) for item in part]

    def mean(self, values):
        return torch.stack(self._exchange(values.clone())).mean(dim=0)


def in_two_processes(work):
    """`work(processes)` on two threads; their results in rank order."""
    board = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=30)}
    results, errors = [None, None], []

    def run(rank):
        try:
            results[rank] = work(ThreadProcesses(rank, 2, board))
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(exc)
            board["barrier"].abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def rollout(prompts=4, k=3, length=6, seed=0):
    """A rollout of `prompts` x `k` samples with uneven completion lengths and random rewards."""
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * k
    completion = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        completion[row, 2: 3 + int(torch.randint(1, length - 2, (1,), generator=generator))] = 1
    sequences = Sequences(torch.randint(1, 50, (rows, length), generator=generator), torch.ones(rows, length, dtype=torch.long), completion)
    rewards = torch.randn(rows, generator=generator)
    return ScoredBatch(["p"] * rows, ["a"] * rows, sequences, {"reward": rewards}, k)


def half(batch, rank):
    rows = len(batch) // 2
    return batch.select(list(range(rank * rows, (rank + 1) * rows)))


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_grpo_batch_scaling_and_dapo_normaliser_match_one_process(loss_type):
    batch = rollout()
    whole = GRPO(scale_rewards="batch", loss_type=loss_type).prepare(None, None, batch)
    halves = in_two_processes(lambda processes: GRPO(scale_rewards="batch", loss_type=loss_type, processes=processes)
                              .prepare(None, None, half(batch, processes.rank)))
    assert torch.equal(torch.cat([h.advantages for h in halves]), whole.advantages)
    assert [h.total_tokens for h in halves] == [whole.total_tokens / 2] * 2

    # one process per half on the same log-probs: the mean of their losses is the whole rollout's loss
    generator = torch.Generator().manual_seed(1)
    logps = -torch.rand(len(batch), batch.sequences.input_ids.shape[1], generator=generator)
    old = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    mask = whole.sequences.completion_mask.clone()
    mask[:, 0] = 0
    rows = len(batch) // 2

    def loss(prepared, part):
        return grpo_loss(logps[part], old[part], prepared.advantages, mask[part], loss_type=loss_type, total_tokens=prepared.total_tokens)[0]

    parts = [loss(h, slice(rank * rows, (rank + 1) * rows)) for rank, h in enumerate(halves)]
    assert torch.allclose((parts[0] + parts[1]) / 2, loss(whole, slice(None)), atol=1e-6)


def test_grpo_batch_scaling_per_process_differs_without_gathering():
    """The test above can fail: each half's own std is not the whole rollout's."""
    batch = rollout()
    whole = GRPO(scale_rewards="batch").prepare(None, None, batch)
    alone = GRPO(scale_rewards="batch").prepare(None, None, half(batch, 0))
    assert not torch.allclose(alone.advantages, whole.advantages[: len(batch) // 2])


def test_rloo_normalised_advantages_match_one_process():
    rewards = rollout().scores["reward"]
    whole = leave_one_out_advantages(rewards, 3, normalize=True)
    halves = in_two_processes(lambda processes: leave_one_out_advantages(rewards[processes.rank * 6: (processes.rank + 1) * 6], 3,
                                                                         normalize=True, processes=processes))
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)
    assert not torch.allclose(leave_one_out_advantages(rewards[:6], 3, normalize=True), whole[:6], atol=1e-3)
