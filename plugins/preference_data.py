"""The `preferences` dataset builder: prompt/chosen/rejected pairs from a file, a folder or the hub.

Accepted sources: a JSONL or JSON file, a CSV file, a Parquet file, a folder
written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`, read at
`split`), or else the name of a Hugging Face hub dataset.

Accepted row formats, all normalized to `PreferenceExample(prompt, chosen, rejected)`:

- standard: `prompt`, `chosen` and `rejected` strings;
- conversational: `chosen` and `rejected` are message lists ending in the
  assistant's answer; the prompt is the `prompt` messages, or when absent
  the messages `chosen` and `rejected` share (an implicit prompt);
- implicit prompt with strings: no `prompt`; `chosen` and `rejected` are full
  texts and their shared beginning, cut back to a word boundary, is the prompt;
- StackExchange paired: `question`, `response_j` (preferred), `response_k`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from pref.errors import PrefError
from pref.examples import PreferenceExample, Prompt
from pref.hookspecs import hookimpl

FORMATS = "expected prompt/chosen/rejected, conversational messages, or question/response_j/response_k"
SOURCES = "a .jsonl/.json, .csv or .parquet file, a folder saved with datasets' save_to_disk, or a hub dataset name"
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class PreferenceData:
    """Preference pairs from a JSONL, CSV or Parquet file, a saved dataset folder, or the hub."""

    def __init__(self, path: str, split: str = "train", limit: int | None = None):
        self.path = path
        self.split = split
        self.limit = limit

    def build(self, policy=None) -> list[PreferenceExample]:
        """Read the pairs; `policy` is not needed (the data is fixed)."""
        return load_preferences(self.path, self.split, self.limit)


@hookimpl
def register_dataset_builders(register):
    register("preferences", PreferenceData)


def load_preferences(path: str, split: str = "train", limit: int | None = None) -> list[PreferenceExample]:
    """Read up to `limit` preference pairs from `path` (see the module docstring for what is accepted)."""
    if limit is not None and limit < 1:
        raise PrefError(f"limit must be a positive number of rows, not {limit}")
    examples = []
    for number, row in enumerate(_read_rows(path, split), start=1):
        if not isinstance(row, dict):
            raise PrefError(f"{path} row {number}: expected an object with named fields, got {type(row).__name__}")
        examples.append(_to_example(row, f"{path} row {number}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise PrefError(f"{path}: no rows of data; {FORMATS}")
    return examples


# Reading sources ---------------------------------------------------------------------------------


def _read_rows(path: str, split: str) -> Iterable[dict]:
    local = os.path.expanduser(path)
    kind = FILE_TYPES.get(os.path.splitext(local)[1].lower())
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, "dataset_dict.json")) or os.path.exists(os.path.join(local, "state.json")):
            return _read_saved_dataset(path, local, split)
        return _load_dataset(path, local, split=split)  # a folder of data files, such as a cloned hub repo
    if os.path.isfile(local):
        if kind is None:
            raise PrefError(f"{path}: unsupported file type; use {SOURCES}")
        if os.path.getsize(local) == 0:
            raise PrefError(f"{path}: the file is empty; {FORMATS}")
        return {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](path, local)
    # "data/prefs.jsonl" or "./prefs" is clearly meant as a file; "org/name" may be a hub dataset
    if kind is not None or path.startswith((".", "/", "~")):
        raise PrefError(f"{path}: no such file or folder; use {SOURCES}")
    return _load_dataset(path, path, split=split)


def _load_dataset(path: str, *args: Any, **kwargs: Any) -> Iterable[dict]:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; the user needs one line
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        if os.path.exists(os.path.expanduser(path)):
            raise PrefError(f"{path}: could not read it ({reason})") from None
        raise PrefError(f"{path}: no such file or folder, and no hub dataset of that name could be loaded ({reason}); use {SOURCES}") from None


def _read_saved_dataset(path: str, local: str, split: str) -> Iterable[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(local)
    except Exception as exc:
        raise PrefError(f"{path}: could not read the saved dataset ({type(exc).__name__}: {_first_line(exc)})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PrefError(f"{path}: no split {split!r}; it has: {', '.join(data)}")
        data = data[split]
    return data


def _read_json(path: str, local: str) -> Iterator[Any]:
    with open(local, encoding="utf-8") as f:
        first = f.read(1024).lstrip()[:1]
        f.seek(0)
        if first == "[":  # one JSON array rather than one object per line
            try:
                yield from json.load(f)
            except json.JSONDecodeError as exc:
                raise PrefError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
            return
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrefError(f"{path} line {line_number}: invalid JSON ({exc.msg} at column {exc.colno})") from None


# CSV and Parquet skip `datasets`: it guesses column types (answers "4" and "5" become ints)
# and fails on a file with a header but no rows.
def _read_csv(path: str, local: str) -> Iterable[dict]:
    import pandas

    try:
        # every cell a string; an empty cell is "" (reported as an empty field), not NaN
        frame = pandas.read_csv(local, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise PrefError(f"{path}: could not read it as CSV ({type(exc).__name__}: {_first_line(exc)})") from None
    return frame.to_dict("records")


def _read_parquet(path: str, local: str) -> Iterator[dict]:
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(local).iter_batches()
    except Exception as exc:
        raise PrefError(f"{path}: could not read it as Parquet ({type(exc).__name__}: {_first_line(exc)})") from None
    for batch in batches:
        yield from batch.to_pylist()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


# Normalizing rows --------------------------------------------------------------------------------


def _to_example(row: dict, where: str) -> PreferenceExample:
    if row.get("chosen") is None and row.get("rejected") is None and row.get("question") is not None:
        question, chosen, rejected = (_text(row, name, where) for name in ("question", "response_j", "response_k"))
        return PreferenceExample(question, chosen, rejected)

    prompt, chosen, rejected = row.get("prompt"), _field(row, "chosen", where), _field(row, "rejected", where)
    if prompt is not None and not isinstance(prompt, str):
        prompt = _messages(prompt, "prompt", where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _conversation_example(prompt, chosen, rejected, where)
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    if prompt is None:
        return _split_text_prompt(chosen, rejected, where)
    return PreferenceExample(prompt, chosen, rejected)


def _field(row: dict, name: str, where: str) -> Any:
    value = row.get(name)
    if value is None:
        raise PrefError(f"{where}: missing field {name!r} ({FORMATS})")
    return value


def _text(row: dict, name: str, where: str) -> str:
    value = _field(row, name, where)
    if not isinstance(value, str):
        raise PrefError(f"{where}: bad field {name!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PrefError(f"{where}: empty field {name!r}")
    return value


def _messages(messages: Any, name: str, where: str) -> list[dict]:
    """Check a message list and keep only role and content (Parquet adds other keys as None)."""
    good = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not good:
        raise PrefError(f"{where}: bad field {name!r}: expected a string or a list of {{'role', 'content'}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _conversation_example(prompt: Prompt | None, chosen: list, rejected: list, where: str) -> PreferenceExample:
    """The answer is each list's final assistant message; anything before it must be shared."""
    chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise PrefError(f"{where}: bad field {name!r}: the last message must be the assistant's answer")
    shared = chosen[:-1]
    if shared != rejected[:-1]:
        raise PrefError(f"{where}: 'chosen' and 'rejected' must differ only in their last (assistant) message")
    if prompt is None:
        if not shared:
            raise PrefError(f"{where}: missing field 'prompt' (no messages shared by 'chosen' and 'rejected' to use instead)")
        prompt = shared
    elif shared:
        if isinstance(prompt, str):
            raise PrefError(f"{where}: bad field 'prompt': a string prompt cannot be followed by more messages in 'chosen'")
        prompt = prompt + shared
    return PreferenceExample(prompt, chosen[-1]["content"], rejected[-1]["content"])


def _split_text_prompt(chosen: str, rejected: str, where: str) -> PreferenceExample:
    """Split two full texts into their shared prompt and the two answers.

    The cut is at a word boundary, so no answer starts mid-word, and leaves
    each answer at least one word. A space before the answer goes with the
    answer, where tokenizers put it ("Assistant:" + " Hello").
    """
    cut = min(len(os.path.commonprefix([chosen, rejected])), len(chosen) - 1, len(rejected) - 1)
    while cut > 0 and not (chosen[cut - 1].isspace() or (chosen[cut].isspace() and rejected[cut].isspace())):
        cut -= 1
    while cut > 0 and chosen[cut - 1] in " \t":
        cut -= 1
    if not chosen[:cut].strip():
        raise PrefError(f"{where}: missing field 'prompt' ('chosen' and 'rejected' share no leading text to use instead)")
    return PreferenceExample(chosen[:cut], chosen[cut:], rejected[cut:])
