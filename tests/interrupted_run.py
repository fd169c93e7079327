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

    original = train_module.TrainingProgress.update

    def update(self, step, metrics):
        original(self, step, metrics)
        if step == stop:
            raise Interrupted()

    train_module.TrainingProgress.update = update
    try:
        cli(["run", *args], standalone_mode=False)
    except Interrupted:
        return
    raise SystemExit(f"the run was not interrupted at step {stop}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
