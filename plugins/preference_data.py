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

The `triple-preferences` builder (TPO's data, TRL's `TPOTrainer` format) reads the same
rows with a gold answer too, in a `reference` column: a string, or a message list ending in
the assistant's answer; with an implicit prompt it starts with that prompt, which is cut off.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pref.errors import PrefError
from pref.examples import PreferenceExample, Prompt
from pref.hookspecs import hookimpl
from pref.plugins.records import messages, read_records, usable_pairs

FORMATS = "expected prompt/chosen/rejected, conversational messages, or question/response_j/response_k"


class PreferenceData:
    """Preference pairs from a JSONL, CSV or Parquet file, a saved dataset folder, or the hub."""

    def __init__(self, path: str, split: str = "train", limit: int | None = None):
        self.path = path
        self.split = split
        self.limit = limit

    def build(self, policy=None) -> list[PreferenceExample]:
        """Read the pairs, leaving out (with a warning) those `policy`'s tokenizer cannot tell apart."""
        examples = load_preferences(self.path, self.split, self.limit)
        return usable_pairs(examples, policy.tokenizer, self.path) if policy is not None else examples


class TriplePreferenceData(PreferenceData):
    """Preference pairs with a gold answer each (a `reference` column: TPO's data), from the same sources."""

    def build(self, policy=None) -> list[PreferenceExample]:
        examples = load_preferences(self.path, self.split, self.limit, gold=True)
        return usable_pairs(examples, policy.tokenizer, self.path) if policy is not None else examples


@hookimpl
def register_dataset_builders(register):
    register("preferences", PreferenceData)
    register("triple-preferences", TriplePreferenceData)


def load_preferences(path: str, split: str = "train", limit: int | None = None, gold: bool = False) -> list[PreferenceExample]:
    """Read up to `limit` preference pairs from `path` (see the module docstring for what is accepted); with `gold`, each
    with its gold answer from the `reference` column."""
    if limit is not None and limit < 1:
        raise PrefError(f"limit must be a positive number of rows, not {limit}")
    examples = []
    for number, row in enumerate(read_records(path, split), start=1):
        if not isinstance(row, dict):
            raise PrefError(f"{path} row {number}: expected an object with named fields, got {type(row).__name__}")
        example = preference_example(row, f"{path} row {number}")
        examples.append(with_gold(example, row, f"{path} row {number}") if gold else example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise PrefError(f"{path}: no rows of data; {FORMATS}")
    return examples


# Normalizing rows --------------------------------------------------------------------------------


def preference_example(row: dict, where: str) -> PreferenceExample:
    """One row in any of the accepted formats as a `PreferenceExample`; `where` names the row in errors."""
    if row.get("chosen") is None and row.get("rejected") is None and row.get("question") is not None:
        question, chosen, rejected = (_text(row, name, where) for name in ("question", "response_j", "response_k"))
        return PreferenceExample(question, chosen, rejected)

    if row.get("prompt") is not None and row.get("chosen") is None and row.get("rejected") is None:  # another objective's data
        other = ("prompt/completion rows train --objective sft" if row.get("completion") is not None else
                 "prompts alone train an objective that samples its answers (--objective online-dpo, grpo, rloo, ...)")
        raise PrefError(f"{where}: a prompt without chosen and rejected answers ({FORMATS}); {other}")
    prompt, chosen, rejected = row.get("prompt"), _field(row, "chosen", where), _field(row, "rejected", where)
    if prompt is not None and not isinstance(prompt, str):
        prompt = messages(prompt, "prompt", where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _conversation_example(prompt or None, chosen, rejected, where)  # a CSV gives "" for no prompt
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    if prompt is None:
        return _split_text_prompt(chosen, rejected, where)
    return PreferenceExample(prompt, chosen, rejected)


def with_gold(example: PreferenceExample, row: dict, where: str) -> PreferenceExample:
    """`example` with the gold answer of `row`'s `reference` field, read as its `chosen` is."""
    value = row.get("reference")
    if value is None:
        raise PrefError(f"{where}: missing field 'reference' (the gold answer TPO learns from besides the pair)")
    if isinstance(value, list):
        answer = messages(value, "reference", where)
        if not answer or answer[-1]["role"] != "assistant":
            raise PrefError(f"{where}: bad field 'reference': the last message must be the assistant's answer")
        chosen = row.get("chosen")
        if isinstance(chosen, list) and answer[:-1] != chosen[:-1]:
            raise PrefError(f"{where}: 'reference' must differ from 'chosen' only in its last (assistant) message")
        return dataclasses.replace(example, gold=answer[-1]["content"])
    gold = _text(row, "reference", where)
    if row.get("prompt") is None and isinstance(row.get("chosen"), str):  # an implicit prompt: the gold text starts with it too
        if not gold.startswith(example.prompt):
            raise PrefError(f"{where}: 'reference' does not start with the prompt 'chosen' and 'rejected' share; add a 'prompt' field")
        gold = gold[len(example.prompt):]
        if not gold.strip():
            raise PrefError(f"{where}: empty field 'reference' after its prompt")
    return dataclasses.replace(example, gold=gold)


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


def _conversation_example(prompt: Prompt | None, chosen: list, rejected: list, where: str) -> PreferenceExample:
    """The answer is each list's final assistant message; anything before it must be shared."""
    chosen, rejected = messages(chosen, "chosen", where), messages(rejected, "rejected", where)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[-1]["role"] != "assistant":
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
