"""Plain records that dataset builders produce and objectives consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

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


@dataclass
class ConversationExample:
    """A conversation whose every assistant turn is an answer to learn, given the turns before it (SFT's `turns=all`)."""

    messages: list[dict]


@dataclass
class PromptExample:
    """A prompt to sample answers to, with the other fields of its row (`columns`: a reference answer, tests, ...), which a
    reward that names them reads (`RewardSource.columns`)."""

    prompt: Prompt
    columns: dict[str, Any] = field(default_factory=dict)


def prompt_of(record: "PreferenceExample | LabeledExample | TextExample | PromptExample | ConversationExample | Prompt") -> Prompt:
    """The prompt of a record; a bare prompt (text or messages) is its own."""
    if isinstance(record, (PreferenceExample, LabeledExample, TextExample, PromptExample)):
        return record.prompt
    if isinstance(record, ConversationExample):  # the turns before its first answer
        return record.messages[: next(i for i, m in enumerate(record.messages) if m["role"] == "assistant")]
    return record


def columns_of(record: Any) -> dict[str, Any]:
    """The fields of a record's row besides its prompt and answers (a `PromptExample`'s columns); none for other records."""
    return record.columns if isinstance(record, PromptExample) else {}
