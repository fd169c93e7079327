"""Launched by `tests/test_fsdp.py` under `accelerate launch`: `pref run ARGS` that crashes once step STOP is done.

Usage: interrupted_run.py STOP ARGS...

Every process stops at the same point (after step STOP's update, between two checkpoints),
as a killed job would; the process then exits 0 so the launcher reports no failure.
"""

import sys


class Interrupted(Exception):
    pass


def main(stop: int, args: list[str]) -> None:
    import pref.train as train_module
    from pref.cli.main import cli

    # every process averages each step's metrics once, after the update (a collective): the
    # STOP-th call is step STOP's, on every process (the progress bar runs on process 0 only)
    original, calls = train_module.mean_across_processes, []

    def mean_across_processes(processes, totals):
        averaged = original(processes, totals)
        calls.append(1)
        if len(calls) == stop:
            raise Interrupted()
        return averaged

    train_module.mean_across_processes = mean_across_processes
    try:
        cli(["run", *args], standalone_mode=False)
    except Interrupted:
        return
    raise SystemExit(f"the run was not interrupted at step {stop}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
