"""One decision for every process of a run: when one process must stop, all stop together, none waits forever."""

from __future__ import annotations

from typing import Any

from pref.errors import PrefError


def same_decision(accelerator: Any, error: str | None) -> None:
    """Raise `PrefError` on every process if any process has an `error` (the first one's message).

    A collective: every process must call it at the same point, each with its
    own `error` (None when it has none).
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = [e for e in gather_object([error]) if e]
        error = errors[0] if errors else None
    if error:
        raise PrefError(error)
