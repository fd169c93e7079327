"""Errors meant for the user: one line saying what is wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrefError(Exception):
    """A problem with the user's input. The CLI prints it on one line and exits with 2."""


class NoUsablePairs(PrefError):
    """Online sampling found no pair to train on in any of its draws.

    At the first step this is a setup problem (the reward gives every sample the
    same score); later it means the policy now earns the same reward for every
    sample, and the training loop stops early, keeping the model.
    """


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "") -> PrefError:
    """An error for a name that is not registered, with close matches when there are some."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        fix = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        fix = "choose one of: " + ", ".join(known) if known else "no plugin provides one"
    return PrefError(f"unknown {kind} {name!r}: {fix}{hint}")
