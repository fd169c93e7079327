"""Errors meant for the user: one line saying what is wrong and how to fix it."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable


class PrefError(Exception):
    """A problem with the user's input. The CLI prints it on one line and exits with 2."""


class NoUsablePairs(PrefError):
    """Online sampling found no pair to train on in any of its draws.

    At the first step this is a setup problem (the reward gives every sample the
    same score); later it means the policy now earns the same reward for every
    sample, and the training loop stops early, keeping the model.
    """


class RunInterrupted(Exception):
    """A run asked to stop (SIGINT, SIGTERM) that stopped after a step, with a checkpoint to resume from.

    Not a `PrefError`: the CLI prints the message and exits with 128 + the signal's number (130, 143), as a shell expects.
    """

    def __init__(self, message: str, signal_number: int, main_process: bool = True):
        super().__init__(message)
        self.exit_code = 128 + signal_number
        self.main_process = main_process  # the process that prints it; each of several stops with the same code


class ModelNotLoaded(PrefError):
    """The policy's model was used before it loaded (a dataset builder that samples from it is built again once it has)."""


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "") -> PrefError:
    """An error for a name that is not registered, with close matches when there are some."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        fix = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        fix = "choose one of: " + ", ".join(known) if known else "no plugin provides one"
    return PrefError(f"unknown {kind} {name!r}: {fix}{hint}")


#: What a value of these types is called in an error, alone and in a list.
TYPE_NAMES = {bool: ("true or false", "true/false values"), int: ("a whole number", "whole numbers"), float: ("a number", "numbers"),
              str: ("a string", "strings"), dict: ("a table of names to values", "tables")}


def expected_type(value: object, hint: object) -> str | None:
    """What `value` should have been, said for a user, when it does not fit the type `hint`; None when it fits.

    Knows bool, int, float (an int is one too), str, dict, list[...] and unions of them with None;
    any other type (Any, a class) is not checked.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        wanted = [expected_type(value, arg) for arg in args if arg is not type(None)]
        if value is None and type(None) in args or None in wanted:
            return None
        return " or ".join(wanted)
    if origin is list:
        item = args[0] if args else object
        if isinstance(value, list) and all(expected_type(v, item) is None for v in value):
            return None
        return f"a list of {TYPE_NAMES[item][1]}" if item in TYPE_NAMES else "a list"
    kind = origin or hint
    if kind not in TYPE_NAMES:
        return None
    fits = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
    return None if fits else TYPE_NAMES[kind][0]
