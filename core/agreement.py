"""One decision for every process of a run: when one process must stop, all stop together, none waits forever."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

from pref.divergence import sampled_non_finite
from pref.errors import NoUsablePairs, PrefError

log = logging.getLogger(__name__)

OK, NO_PAIRS, ERROR = 0, 1, 2


class StopRequests:
    """`with StopRequests(announce) as stop:` the loop's time, when SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption
    or time limit, `kill`) asks the run to stop: `stop.signal` is then the first one's number, else 0.

    The loop stops after a step, with a checkpoint, on every process together (each passes its `stop.signal` on with the
    step's figures). A second Ctrl-C stops at once (KeyboardInterrupt). Outside the main thread, signals are left alone.
    The handlers that were there before come back on exit.
    """

    def __init__(self, announce: bool):
        self.announce, self.signal, self.previous = announce, 0, {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._request) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python

    def _request(self, number: int, frame: Any) -> None:
        if self.signal and number == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signal and self.announce:
            log.warning(f"{signal.Signals(number).name}: the run stops after this step (or rollout) and saves a checkpoint to resume from"
                        f"{' (Ctrl-C again stops at once)' if number == signal.SIGINT else ''}")
        self.signal = self.signal or number


def same_decision(accelerator: Any, error: str | None) -> None:
    """Raise `PrefError` on every process if any process has an `error` (the lowest rank's message).

    A collective: every process calls it at the same point with its own
    `error` (None when it has none). Costs one tiny all-reduce when all is well.
    """
    _agree(accelerator, ERROR if error else OK, error)


def next_batch_together(data: Any, accelerator: Any, on_non_finite: Any) -> tuple[Any, dict[str, float]]:
    """`data.next()` with one outcome on every process: the batch, or the same exception everywhere.

    `NoUsablePairs` on any process is raised on all (the loop decides to stop
    or fail), as is a `PrefError`; torch refusing to sample from non-finite
    probabilities becomes the `PrefError` `on_non_finite()` (a message).
    """
    result, code, message = None, OK, None
    try:
        result = data.next()
    except NoUsablePairs as exc:
        code, message = NO_PAIRS, str(exc)
    except PrefError as exc:
        code, message = ERROR, str(exc)
    except RuntimeError as exc:
        if not sampled_non_finite(exc):
            raise
        code, message = ERROR, on_non_finite()
    _agree(accelerator, code, message)
    return result


def _agree(accelerator: Any, code: int, message: str | None) -> None:
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        worst = accelerator.reduce(torch.tensor([code], device=accelerator.device), reduction="sum")
        if int(worst.item()) == OK:
            return
        reports = [r for r in gather_object([(code, message)]) if r[0] != OK]
        code = max(c for c, _ in reports)
        message = next(m for c, m in reports if c == code)
    if code == NO_PAIRS:
        raise NoUsablePairs(message)
    if code == ERROR:
        raise PrefError(message)
