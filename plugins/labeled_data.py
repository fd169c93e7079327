"""The `labeled` dataset builder: unpaired prompt/completion rows with a good-or-bad label.

Accepted sources are those of the `preferences` builder: a JSONL or JSON
file, a CSV file, a Parquet file, a folder saved with `datasets`, or a hub
dataset name.

Each row is `prompt` (a string or a list of chat messages), `completion`
(or `response`) and `label`, the unpaired format TRL's KTO trainer reads.
A label is accepted when it is true, 1, "positive", "accepted" or "true",
and rejected when it is false, 0, "negative", "rejected" or "false" (any
case). A preference row (prompt/chosen/rejected, without a label) is read
as one accepted and one rejected example.
"""

from __future__ import annotations

from typing import Any

from pref.errors import PrefError
from pref.examples import LabeledExample, Prompt
from pref.hookspecs import hookimpl
from pref.plugins.preference_data import preference_example
from pref.plugins.records import messages, read_records, usable_answers

FORMATS = "expected prompt, completion (or response) and label, or prompt/chosen/rejected"
POSITIVE = {"positive", "accepted", "true", "1", "1.0"}
NEGATIVE = {"negative", "rejected", "false", "0", "0.0"}
LABELS = "positive/negative, accepted/rejected, true/false or 1/0"


class LabeledData:
    """Unpaired prompt/completion rows labelled accepted or rejected, from a file, a folder or the hub."""

    def __init__(self, path: str, split: str = "train", limit: int | None = None):
        if limit is not None and limit < 1:
            raise PrefError(f"labeled: limit must be a positive number of rows, not {limit}")
        self.path = path
        self.split = split
        self.limit = limit

    def build(self, policy=None) -> list[LabeledExample]:
        """Read the examples, leaving out (with a warning) those that cannot teach `policy` anything."""
        examples = load_labeled(self.path, self.split, self.limit)
        return usable_answers(examples, policy.tokenizer, self.path) if policy is not None else examples


def load_labeled(path: str, split: str = "train", limit: int | None = None) -> list[LabeledExample]:
    """Read up to `limit` labelled examples from `path` (see the module docstring for what is accepted)."""
    examples: list[LabeledExample] = []
    for number, row in enumerate(read_records(path, split), start=1):
        where = f"{path} row {number}"
        if not isinstance(row, dict):
            raise PrefError(f"{where}: expected an object with named fields, got {type(row).__name__}")
        examples.extend(row_examples(row, where))
        if limit is not None and len(examples) >= limit:
            return examples[:limit]
    if not examples:
        raise PrefError(f"{path}: no rows of data; {FORMATS}")
    return examples


def row_examples(row: dict, where: str) -> list[LabeledExample]:
    """The labelled examples in one row: one, or two for a preference row."""
    if _missing(row, "label") and not _missing(row, "chosen") and not _missing(row, "rejected"):
        pair = preference_example(row, where)
        return [LabeledExample(pair.prompt, pair.chosen, True), LabeledExample(pair.prompt, pair.rejected, False)]
    prompt = _prompt(row, where)
    name = "completion" if not _missing(row, "completion") or _missing(row, "response") else "response"
    completion = _text(row, name, where, missing=f"missing field 'completion' (or 'response'); {FORMATS}")
    return [LabeledExample(prompt, completion, parse_label(row.get("label"), where))]


def parse_label(value: Any, where: str) -> bool:
    """True for an accepted label, False for a rejected one; a one-line `PrefError` naming `where` otherwise."""
    if _is_missing(value):
        raise PrefError(f"{where}: missing field 'label' ({LABELS})")
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in POSITIVE:
        return True
    if text in NEGATIVE:
        return False
    raise PrefError(f"{where}: bad field 'label': expected {LABELS}, got {value!r}")


def _is_missing(value: Any) -> bool:
    # CSV gives "" for an empty cell; Parquet gives None for an absent value
    return value is None or (isinstance(value, str) and not value.strip())


def _missing(row: dict, name: str) -> bool:
    return _is_missing(row.get(name))


def _prompt(row: dict, where: str) -> Prompt:
    value = row.get("prompt")
    if isinstance(value, list):
        return messages(value, "prompt", where)
    return _text(row, "prompt", where, missing=f"missing field 'prompt'; {FORMATS}")


def _text(row: dict, name: str, where: str, missing: str) -> str:
    value = row.get(name)
    if value is None:
        raise PrefError(f"{where}: {missing}")
    if not isinstance(value, str):
        raise PrefError(f"{where}: bad field {name!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PrefError(f"{where}: empty field {name!r}")
    return value


@hookimpl
def register_dataset_builders(register):
    register("labeled", LabeledData)
