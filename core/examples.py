"""Plain records that dataset builders produce and objectives consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

#: A prompt is plain text or a list of chat messages ({"role": ..., "content": ...}).
Prompt = Union[str, list[dict]]


@dataclass
class PreferenceExample:
    """One prompt with a preferred (`chosen`) and a dispreferred (`rejected`) answer, and maybe a `gold` one (TPO's)."""

    prompt: Prompt
    chosen: str
    rejected: str
    gold: str | None = None


@dataclass
class LabeledExample:
    """One prompt and answer with a label: True if accepted (positive), False if rejected."""

    prompt: Prompt
    completion: str
    label: bool


@dataclass
class TextExample:
    """Plain text for language modelling: `text` continues `prompt` (which may be empty).

    Online objectives sample from `prompt`; likelihood-based measures score `text` given it.
    """

    text: str
    prompt: Prompt = ""


def prompt_of(record: "PreferenceExample | LabeledExample | TextExample | Prompt") -> Prompt:
    """The prompt of a record; a bare prompt (text or messages) is its own."""
    if isinstance(record, (PreferenceExample, LabeledExample, TextExample)):
        return record.prompt
    return record
