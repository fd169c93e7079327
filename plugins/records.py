"""Reading records for dataset builders: rows from a file, a saved dataset folder or the hub.

A dataset builder (pref's own or a third party's) turns rows into examples;
this module gives it the rows, with the problems of real files turned into
one-line `PrefError`s:

- `read_records(path, split)`: the rows of a JSONL/JSON, CSV or Parquet file, a
  folder saved with `datasets.save_to_disk`, a folder of data files, or a hub
  dataset. Text files are decoded by their byte-order mark (UTF-8, UTF-8 with
  BOM, UTF-16, UTF-32); anything else undecodable is an error naming the file.
  CSV cells that pandas wrote from Python objects (`[{'content': ..., 'role':
  'user'}, ...]`, `{'en': ...}`, with `True`/`False`) come back as those
  objects, parsed with `ast.literal_eval` (never `eval`); an index column
  pandas added (`Unnamed: 0`) is dropped.
- `read_text(path)`: a whole text file, decoded the same way.
- `messages(value, name, where)`: a checked chat-message list.
- `usable_pairs(examples, tokenizer, source)` and `usable_answers(...)`: preference
  pairs or labelled answers without those that cannot teach anything (see their docstrings).
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from pref.errors import PrefError

log = logging.getLogger(__name__)

SOURCES = "a .jsonl/.json, .csv or .parquet file, a folder saved with datasets' save_to_disk, or a hub dataset name"
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# longest first: the UTF-32 little-endian mark begins with the UTF-16 one
BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
PANDAS_INDEX = re.compile(r"^Unnamed: \d+$")


def read_records(path: str, split: str = "train") -> Iterable[Any]:
    """The rows (usually dicts) of `path`: a file, a saved or plain dataset folder, or a hub dataset name.

    Raises a one-line `PrefError` for a missing, empty, unsupported or unreadable source.
    """
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
            raise PrefError(f"{path}: the file is empty")
        return {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](path, local)
    # "data/prefs.jsonl" or "./prefs" is clearly meant as a file; "org/name" may be a hub dataset
    if kind is not None or path.startswith((".", "/", "~")):
        raise PrefError(f"{path}: no such file or folder; use {SOURCES}")
    return _load_hub_dataset(path, split)


def text_encoding(path: str) -> str:
    """The codec for the text file `path`: from its byte-order mark, else UTF-8.

    A file with NUL bytes and no mark is not text (or is UTF-16 saved without
    a mark, which cannot be told apart reliably): a `PrefError` says so.
    """
    with open(os.path.expanduser(path), "rb") as f:
        head = f.read(4096)
    for mark, encoding in BOMS:
        if head.startswith(mark):
            return encoding
    if b"\x00" in head:
        raise PrefError(f"{path}: not a text file (it holds NUL bytes: binary data, or UTF-16 without a byte-order mark); save it as UTF-8")
    return "utf-8"


def read_text(path: str) -> str:
    """The whole text file `path`, decoded by `text_encoding`."""
    encoding = text_encoding(path)
    with open(os.path.expanduser(path), encoding=encoding, errors="surrogateescape") as f:
        text = f.read()
    _check_decoded(path, encoding, text)
    return text


def messages(value: Any, name: str, where: str) -> list[dict]:
    """`value` checked as a list of {"role", "content"} strings; only role and content are kept.

    A string holding such a list (a CSV cell) is parsed first. `name` and
    `where` (e.g. "data.csv row 3") name the field in the error.
    """
    if isinstance(value, str):
        value = literal(value)
    good = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not good:
        raise PrefError(f"{where}: bad field {name!r}: expected a string or a list of {{'role', 'content'}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def literal(text: str) -> Any:
    """The list or dict that `text` spells in JSON or as a Python literal, else `text` itself.

    Only lists of dicts or of strings and dicts are taken (message lists,
    moderation results, translation pairs, lists of turns), so answer text
    that merely starts with a bracket stays text.
    """
    stripped = text.strip()
    if not (stripped[:1] in "[{" and stripped[-1:] in "]}"):
        return text
    for parse in (json.loads, ast.literal_eval):  # literal_eval builds only literals: no code runs
        try:
            value = parse(stripped)
            break
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    else:
        return text
    if isinstance(value, dict) or (isinstance(value, list) and value and
                                   (all(isinstance(v, dict) for v in value) or all(isinstance(v, str) for v in value))):
        return value
    return text


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def usable_pairs(examples: list, tokenizer: Any, source: str) -> list:
    """The preference pairs of `examples` that can teach something, with one warning counting the rest.

    A pair teaches nothing when its prompt is empty, or when `tokenizer` gives
    `chosen` and `rejected` the same tokens (equal texts, or texts that differ
    only in words it maps to the unknown token), or when either answer is
    nothing but unknown tokens. All useless: a `PrefError` naming `source`.
    """
    chosen_ids, rejected_ids = _encode(tokenizer, [e.chosen for e in examples]), _encode(tokenizer, [e.rejected for e in examples])

    def problem(example: Any, chosen: list[int], rejected: list[int]) -> str | None:
        if _empty_prompt(example.prompt):
            return "empty prompt"
        if example.chosen == example.rejected:
            return "chosen identical to rejected"
        if _unknown_only(tokenizer, chosen) or _unknown_only(tokenizer, rejected):
            return "an answer of unknown tokens only"
        if chosen == rejected:
            return "chosen and rejected tokenized identically"
        return None

    return _keep_usable(examples, [problem(*row) for row in zip(examples, chosen_ids, rejected_ids)], source, "pairs",
                        "chosen and rejected must differ in words the model's tokenizer knows")


def usable_answers(examples: list, tokenizer: Any, source: str) -> list:
    """The labelled answers of `examples` that can teach something (not an empty prompt, not unknown tokens only)."""
    ids = _encode(tokenizer, [e.completion for e in examples])

    def problem(example: Any, completion: list[int]) -> str | None:
        if _empty_prompt(example.prompt):
            return "empty prompt"
        if _unknown_only(tokenizer, completion):
            return "an answer of unknown tokens only"
        return None

    return _keep_usable(examples, [problem(*row) for row in zip(examples, ids)], source, "answers",
                        "answers must be in words the model's tokenizer knows")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _empty_prompt(prompt: Any) -> bool:
    return isinstance(prompt, str) and not prompt.strip()


def _unknown_only(tokenizer: Any, ids: list[int]) -> bool:
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is not None and set(ids) <= {unk}


def _keep_usable(examples: list, problems: list[str | None], source: str, what: str, fix: str) -> list:
    """`examples` without those that have a problem; one warning counting them, a `PrefError` if none is left."""
    kept = [example for example, problem in zip(examples, problems) if problem is None]
    reasons: dict[str, int] = {}
    for problem in problems:
        if problem is not None:
            reasons[problem] = reasons.get(problem, 0) + 1
    if not reasons:
        return kept
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    if not kept:
        raise PrefError(f"{source}: none of its {len(examples)} {what} can teach anything ({counts}); {fix}")
    log.warning(f"{source}: skipped {len(examples) - len(kept)} of {len(examples)} {what} that cannot teach anything ({counts})")
    return kept


# Reading sources ---------------------------------------------------------------------------------


# undecodable bytes are read as these lone surrogates ("surrogateescape"), so the error can name the line
UNDECODED = re.compile("[\udc80-\udcff]")


def _check_decoded(path: str, encoding: str, text: str, line: int | None = None) -> None:
    bad = UNDECODED.search(text)
    if bad is None:
        return
    line = line or text.count("\n", 0, bad.start()) + 1
    name = encoding.upper().replace("-SIG", "")
    raise PrefError(f"{path}: not {name} text (undecodable byte 0x{ord(bad.group()) - 0xDC00:02x} at line {line}); save it as UTF-8")


def _decode_error(path: str, encoding: str, exc: UnicodeDecodeError) -> PrefError:
    name = encoding.upper().replace("-SIG", "")
    return PrefError(f"{path}: not {name} text (undecodable byte 0x{exc.object[exc.start:exc.start + 1].hex()}); save it as UTF-8")


def _load_dataset(path: str, *args: Any, **kwargs: Any) -> Iterable[dict]:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; the user needs one line
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        if os.path.exists(os.path.expanduser(path)):
            raise PrefError(f"{path}: could not read it ({reason})") from None
        raise PrefError(f"{path}: no such file or folder, and no hub dataset of that name could be loaded ({reason}); use {SOURCES}") from None


def _load_hub_dataset(name: str, split: str) -> Iterable[dict]:
    """A hub dataset's split, from `datasets`' own cache alone when it is there and the hub cannot be reached (or offline mode is set)."""
    from pref.hub import cache_only

    if not cache_only(name, "dataset"):  # the hub answers: `datasets` asks it as usual
        return _load_dataset(name, name, split=split)
    import datasets

    with _datasets_offline():
        try:
            return datasets.load_dataset(name, split=split)
        except Exception as exc:
            raise PrefError(f"{name}: could not load it from the local datasets cache ({type(exc).__name__}: {first_line(exc)}), and the "
                            "hub cannot be asked (it cannot be reached, or offline mode is set)") from None


@contextlib.contextmanager
def _datasets_offline() -> Iterator[None]:
    """`datasets` in offline mode, which reads a hub dataset from its cache without asking the hub for its card (and
    retrying for 23 s), and without its warnings that it does ("Using the latest cached version of the dataset ...")."""
    import datasets

    offline, verbosity = datasets.config.HF_HUB_OFFLINE, datasets.logging.get_verbosity()
    # set after `datasets` read HF_HUB_OFFLINE and HF_DATASETS_OFFLINE when imported: its loaders read this at each call
    datasets.config.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
        datasets.logging.set_verbosity(verbosity)


def _read_saved_dataset(path: str, local: str, split: str) -> Iterable[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(local)
    except Exception as exc:
        raise PrefError(f"{path}: could not read the saved dataset ({type(exc).__name__}: {first_line(exc)})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PrefError(f"{path}: no split {split!r}; it has: {', '.join(data)}")
        data = data[split]
    return data


def _read_json(path: str, local: str) -> Iterator[Any]:
    encoding = text_encoding(local)
    with open(local, encoding=encoding, errors="surrogateescape") as f:
        first = f.read(1024).lstrip()[:1]
        f.seek(0)
        if first == "[":  # one JSON array rather than one object per line
            text = f.read()
            _check_decoded(path, encoding, text)
            try:
                yield from json.loads(text)
            except json.JSONDecodeError as exc:
                raise PrefError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
            return
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            _check_decoded(path, encoding, line, line_number)
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrefError(f"{path} line {line_number}: invalid JSON ({exc.msg} at column {exc.colno})") from None


# CSV and Parquet skip `datasets`: it guesses column types (answers "4" and "5" become ints)
# and fails on a file with a header but no rows.
def _read_csv(path: str, local: str) -> Iterable[dict]:
    import pandas

    encoding = text_encoding(local)
    try:
        # every cell a string; an empty cell is "" (reported as an empty field), not NaN
        frame = pandas.read_csv(local, dtype=str, keep_default_na=False, encoding=encoding)
    except UnicodeDecodeError as exc:
        raise _decode_error(path, encoding, exc) from None
    except Exception as exc:
        raise PrefError(f"{path}: could not read it as CSV ({type(exc).__name__}: {first_line(exc)})") from None
    frame = frame.drop(columns=[c for c in frame.columns if PANDAS_INDEX.match(str(c))])
    return [{k: literal(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _read_parquet(path: str, local: str) -> Iterator[dict]:
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(local).iter_batches()
    except Exception as exc:
        raise PrefError(f"{path}: could not read it as Parquet ({type(exc).__name__}: {first_line(exc)})") from None
    for batch in batches:
        yield from batch.to_pylist()
