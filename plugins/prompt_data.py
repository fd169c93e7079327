"""The `prompts` dataset builder: what an online objective samples from, TRL's prompt-only datasets included.

Accepted sources are those of the `preferences` builder: a JSONL or JSON file, a CSV file, a
Parquet file, a folder saved with `datasets`, or a hub dataset name. Each row gives one record:

- a prompt alone: `prompt` (a string, or chat messages ending in the user's turn), `question`
  (GSM8K's and MATH's column) or `messages` (a conversation: its messages before the last
  assistant answer, which becomes the row's `completion` column); a JSONL line may also be the prompt
  itself. The row's other fields (a reference answer, tests) are the `PromptExample`'s columns, which a
  reward that names them reads (`RewardSource.columns`, TRL's reward functions' dataset columns);
- a preference row (any format of the `preferences` builder): the pair, whose prompt is sampled
  from, and whose chosen answer `--validation-split` and a curriculum score;
- a labelled row (the `labeled` builder's `prompt`, `completion` and `label`): the labelled
  answer, likewise.
"""

from __future__ import annotations

from typing import Any

from pref.errors import PrefError
from pref.examples import LabeledExample, PreferenceExample, Prompt, PromptExample
from pref.hookspecs import hookimpl
from pref.plugins.labeled_data import row_examples
from pref.plugins.preference_data import preference_example
from pref.plugins.records import literal, messages, read_records

FORMATS = ("expected a prompt ('prompt': a string or chat messages; 'question'; or a conversation in 'messages'), "
           "a preference pair or a labelled answer")


class PromptData:
    """Prompts for online objectives (prompt-only rows, or the prompts of pairs and labelled answers), from a file, a folder or the hub."""

    def __init__(self, path: str, split: str = "train", limit: int | None = None):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise PrefError(f"prompts: limit must be a positive number of rows, not {limit!r}")
        self.path, self.split, self.limit = path, split, limit

    def build(self, policy: Any = None) -> list[PromptExample | PreferenceExample | LabeledExample]:
        """Read the records; `policy` is not needed (the data is fixed)."""
        return load_prompts(self.path, self.split, self.limit)


def load_prompts(path: str, split: str = "train", limit: int | None = None) -> list[PromptExample | PreferenceExample | LabeledExample]:
    """Up to `limit` records of `path`, one per row (see the module docstring)."""
    records: list[PromptExample | PreferenceExample | LabeledExample] = []
    for number, row in enumerate(read_records(path, split), start=1):
        records.append(prompt_record(row, f"{path} row {number}"))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise PrefError(f"{path}: no rows of data; {FORMATS}")
    return records


def prompt_record(row: Any, where: str) -> PromptExample | PreferenceExample | LabeledExample:
    """One row as a record: a prompt with the row's other fields, or a pair or a labelled answer; `where` names the row in errors."""
    if isinstance(row, str):
        return PromptExample(_prompt_text(row, "prompt", where))
    if not isinstance(row, dict):
        raise PrefError(f"{where}: expected a prompt or an object with named fields, got {type(row).__name__}")
    present = {name for name, value in row.items() if value is not None and value != ""}  # a CSV gives "" for an empty cell
    if {"chosen", "rejected"} <= present or {"response_j", "response_k"} <= present:
        return preference_example(row, where)
    if "label" in present:
        return row_examples(row, where)[0]
    for name in ("prompt", "question", "messages"):
        if name in present:
            others = {key: value for key, value in row.items() if key != name}
            prompt = _prompt(row[name], name, where)
            answer = messages(row[name], name, where)[len(prompt):] if name == "messages" else []
            if answer and "completion" not in others:  # a conversation's answer: what GKD's off-policy steps train on
                others["completion"] = answer[0]["content"]
            return PromptExample(prompt, others)
    raise PrefError(f"{where}: no field 'prompt'; {FORMATS}")


def _prompt(value: Any, name: str, where: str) -> Prompt:
    """A prompt field: text (`prompt`, `question`), or messages (`prompt`; `messages`, whose last assistant answer is cut off)."""
    if name == "question" or (name == "prompt" and isinstance(value, str) and isinstance(literal(value), str)):
        return _prompt_text(value, name, where)
    conversation = messages(value, name, where)
    while name == "messages" and conversation and conversation[-1]["role"] == "assistant":  # the answer, when there is one
        conversation = conversation[:-1]
    return _chat_prompt(conversation, name, where)


def _prompt_text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise PrefError(f"{where}: bad field {name!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PrefError(f"{where}: empty field {name!r}")
    return value


def _chat_prompt(conversation: list[dict], name: str, where: str) -> list[dict]:
    if not conversation or conversation[-1]["role"] == "assistant":
        raise PrefError(f"{where}: bad field {name!r}: a prompt's messages must end in a turn the model answers (the user's), not be empty "
                        "or end in an answer")
    return conversation


@hookimpl
def register_dataset_builders(register):
    register("prompts", PromptData)
