"""Plain-text dataset builders: `text`, `dialogue` and `translation`, each giving `TextExample`s.

Sources are read as the `preferences` builder reads them (a JSONL/JSON, CSV or
Parquet file, a folder saved with `datasets`, or a hub dataset name); `text`
also reads `.txt` files, one record per line or per paragraph.

Every builder takes `prompt_words` (default 8): the first that many words of a
text become its prompt and the rest its text, so online objectives sample
continuations of the data and likelihood measures score the rest given the
start. A text of `prompt_words` words or fewer keeps its last word as the text;
`prompt_words=0` keeps every whole text with an empty prompt.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from pref.errors import PrefError
from pref.examples import TextExample
from pref.hookspecs import hookimpl
from pref.plugins.records import read_records, read_text

UNITS = ("line", "paragraph")
DIALOGUE_COLUMNS = ("dialog", "dialogue", "turns", "messages", "conversation")


def split_prompt(text: str, prompt_words: int) -> TextExample:
    """`TextExample` with the first `prompt_words` words as the prompt (the space before the rest goes with the text)."""
    words = list(re.finditer(r"\S+", text))
    cut = min(prompt_words, len(words) - 1)
    if cut <= 0:
        return TextExample(text.strip())
    end = words[cut - 1].end()
    return TextExample(text[end:].rstrip(), prompt=text[:end].lstrip())


class _TextRows:
    """Shared reading: rows from a source, one text per row, an optional `limit`, then the prompt split."""

    name = "text"

    def __init__(self, path: str, split: str = "train", limit: int | None = None, prompt_words: int = 8):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise PrefError(f"{self.name}: limit must be a positive number of records, not {limit!r}")
        if not isinstance(prompt_words, int) or prompt_words < 0:
            raise PrefError(f"{self.name}: prompt_words must be zero or a positive whole number, not {prompt_words!r}")
        self.path = path
        self.split = split
        self.limit = limit
        self.prompt_words = prompt_words

    def build(self, policy: Any = None) -> list[TextExample]:
        """Read the records; `policy` is not needed (the data is fixed)."""
        examples = []
        for text in self.texts():
            if text.strip():
                examples.append(split_prompt(text, self.prompt_words))
                if self.limit is not None and len(examples) >= self.limit:
                    break
        if not examples:
            raise PrefError(f"{self.path}: no text in it")
        return examples

    def rows(self) -> Iterator[tuple[str, Any]]:
        """(where, row) for each row of the source, `where` naming it in errors."""
        local = os.path.expanduser(self.path)
        if os.path.isfile(local) and os.path.getsize(local) == 0:
            raise PrefError(f"{self.path}: the file is empty")
        for number, row in enumerate(read_records(self.path, self.split), start=1):
            yield f"{self.path} row {number}", row

    def texts(self) -> Iterable[str]:
        raise NotImplementedError


class TextData(_TextRows):
    """Plain texts: .txt files (a record per line or paragraph), or a text column of data files, saved datasets or the hub.

    Options:
        path: the file, folder or hub name.
        unit: for .txt files, "line" (default) or "paragraph" (blocks separated by blank lines).
        column: the text column of other sources (default "text").
        split: the split of a saved DatasetDict or hub dataset (default "train").
        limit: read at most this many records.
        prompt_words: the words of each text that become its prompt (default 8; 0: none).
    """

    name = "text"

    def __init__(self, path: str, unit: str = "line", column: str = "text", split: str = "train", limit: int | None = None, prompt_words: int = 8):
        super().__init__(path, split, limit, prompt_words)
        if unit not in UNITS:
            raise PrefError(f"text: unit must be one of {', '.join(UNITS)}, not {unit!r}")
        self.unit = unit
        self.column = column

    def texts(self) -> Iterable[str]:
        local = os.path.expanduser(self.path)
        if local.lower().endswith(".txt"):
            if not os.path.isfile(local):
                raise PrefError(f"{self.path}: no such file")
            content = read_text(self.path)
            return content.splitlines() if self.unit == "line" else [" ".join(p.split()) for p in re.split(r"\n\s*\n", content)]
        return (self._text(row, where) for where, row in self.rows())

    def _text(self, row: Any, where: str) -> str:
        if isinstance(row, str):
            return row
        if not isinstance(row, dict):
            raise PrefError(f"{where}: expected a string or an object with a {self.column!r} field, got {type(row).__name__}")
        value = row.get(self.column)
        if value is None:
            raise PrefError(f"{where}: missing field {self.column!r} (choose the text column with --dataset-option column=NAME)")
        if not isinstance(value, str):
            raise PrefError(f"{where}: bad field {self.column!r}: expected a string, got {type(value).__name__}")
        return value


class DialogueData(_TextRows):
    """Dialogues as one text each: the turns of a row's list (DailyDialog's `dialog`), joined.

    Options:
        path: the file, folder or hub name.
        column: the list of turns (default: the first of dialog, dialogue, turns, messages, conversation);
            turns are strings or {"role", "content"} messages.
        separator: put between turns (default a newline).
        split, limit, prompt_words: as for `text`.
    """

    name = "dialogue"

    def __init__(self, path: str, column: str | None = None, separator: str = "\n", split: str = "train", limit: int | None = None, prompt_words: int = 8):
        super().__init__(path, split, limit, prompt_words)
        self.column = column
        self.separator = separator

    def texts(self) -> Iterable[str]:
        for where, row in self.rows():
            yield self.separator.join(self._turns(row, where))

    def _turns(self, row: Any, where: str) -> list[str]:
        if not isinstance(row, dict):
            raise PrefError(f"{where}: expected an object with a list of turns, got {type(row).__name__}")
        columns = [self.column] if self.column else [c for c in DIALOGUE_COLUMNS if c in row]
        if not columns or row.get(columns[0]) is None:
            expected = repr(self.column) if self.column else "one of " + ", ".join(DIALOGUE_COLUMNS)
            raise PrefError(f"{where}: missing field {expected} (a list of turns; choose it with --dataset-option column=NAME)")
        turns = row[columns[0]]
        if not isinstance(turns, list):
            raise PrefError(f"{where}: bad field {columns[0]!r}: expected a list of turns, got {type(turns).__name__}")
        texts = []
        for turn in turns:
            if isinstance(turn, dict) and isinstance(turn.get("content"), str):
                turn = turn["content"]
            if not isinstance(turn, str):
                raise PrefError(f"{where}: bad field {columns[0]!r}: a turn must be a string or a {{'role', 'content'}} message")
            texts.append(turn.strip())
        return texts


class TranslationData(_TextRows):
    """One side of translation pairs: rows with `translation: {en: ..., de: ...}` (WMT, opus) or a column per language.

    Options:
        path: the file, folder or hub name.
        language: the side to keep (default "en").
        split, limit, prompt_words: as for `text`.
    """

    name = "translation"

    def __init__(self, path: str, language: str = "en", split: str = "train", limit: int | None = None, prompt_words: int = 8):
        super().__init__(path, split, limit, prompt_words)
        self.language = language

    def texts(self) -> Iterable[str]:
        for where, row in self.rows():
            if not isinstance(row, dict):
                raise PrefError(f"{where}: expected an object with a 'translation' field, got {type(row).__name__}")
            pair = row.get("translation", row)
            if not isinstance(pair, dict):
                raise PrefError(f"{where}: bad field 'translation': expected an object of language -> text, got {type(pair).__name__}")
            text = pair.get(self.language)
            if not isinstance(text, str):
                have = ", ".join(k for k, v in pair.items() if isinstance(v, str)) or "none"
                raise PrefError(f"{where}: no {self.language!r} text (languages here: {have}); choose one with --dataset-option language=CODE")
            yield text


@hookimpl
def register_dataset_builders(register):
    register("text", TextData)
    register("dialogue", DialogueData)
    register("translation", TranslationData)
