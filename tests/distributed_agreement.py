"""Launched by `tests/test_agreement.py` under `accelerate launch` (2 CPU processes): one process fails, all decide.

Usage: distributed_agreement.py REPORT_DIR

Each process writes `outcome-rank<k>.json`: for each case, the exception type and message it ended with.
"""

import json
import os
import sys


def main(report_dir: str) -> None:
    from accelerate import Accelerator

    from pref.agreement import next_batch_together, same_decision
    from pref.divergence import check_step
    from pref.errors import NoUsablePairs, PrefError

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    config = type("Config", (), {"lr": 0.1, "objective_options": {"beta": 0.1}})()

    class Data:
        def __init__(self, failure):
            self.failure = failure

        def next(self):
            if rank == 1 and self.failure is not None:
                raise self.failure
            return "batch", {}

    def drawing_together():
        """Online DPO's draw with a second model trained after it (a collective, as D2PO's): rank 1's reward fails."""
        from types import SimpleNamespace

        import torch

        from pref.interfaces import PAIRS, ObjectiveNeeds, RewardSource, Samples, SamplingConfig, Selection
        from pref.online import OnlineBatches
        from pref.sequences import Sequences
        from pref.train import AcceleratedProcesses

        class Reward(RewardSource):
            def score(self, prompts, completions):
                if rank == 1:
                    raise PrefError("rank 1's reward failed")
                return {"reward": torch.arange(len(completions), dtype=torch.float32)}

        class Selector:
            needs_logps = False

            def select(self, pool):
                return Selection(pairs=[(p, 1, 0) for p in range(len(pool.prompts))])

        def sample(prompts, k, sampling):
            ones = torch.ones(len(prompts) * k, 3, dtype=torch.long)
            return Samples([[f"{p} {j}" for j in range(k)] for p in prompts], Sequences(ones, ones, ones))

        processes = AcceleratedProcesses(accelerator)
        after_draw = lambda: {"second/loss": processes.mean(torch.ones(4)).sum().item()}  # noqa: E731
        batches = OnlineBatches(SimpleNamespace(sample=sample), ["a", "b", "c", "d"], Reward(), Selector(), ObjectiveNeeds(online=True, data=PAIRS),
                                2, SamplingConfig(), 2, seed=0, rank=rank, world=2, after_draw=after_draw, processes=processes)
        return next_batch_together(batches, accelerator, lambda: "")

    cases = {
        "no pairs on one process": lambda: next_batch_together(Data(NoUsablePairs("rank 1 has no pair")), accelerator, lambda: ""),
        "user error on one process": lambda: next_batch_together(Data(PrefError("rank 1 is unhappy")), accelerator, lambda: ""),
        "nan sampling on one process": lambda: next_batch_together(
            Data(RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")), accelerator, lambda: f"diverged ({rank})"),
        "nan loss on one process": lambda: same_decision(accelerator, check_step(7, float("nan") if rank == 1 else 0.5, 1.0, config)),
        "a reward error on one process, drawing together": drawing_together,
        "all well": lambda: next_batch_together(Data(None), accelerator, lambda: ""),
    }
    outcome = {}
    for name, case in cases.items():
        try:
            case()
            outcome[name] = ["ok", ""]
        except PrefError as exc:
            outcome[name] = [type(exc).__name__, str(exc)]
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"outcome-rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    accelerator.end_training()  # tears the process group down: left to the interpreter's exit, gloo's threads may abort it


if __name__ == "__main__":
    main(*sys.argv[1:])
