"""The `lmsys` dataset builder: labelled prompt/response examples from lmsys-chat-1m conversations.

lmsys-chat-1m (Zheng et al. 2023) is gated on the Hugging Face hub, so this
reads a local copy (a JSONL, JSON, Parquet or CSV file, or a saved or cloned
dataset folder; a pandas CSV export's Python-literal cells are read, see
`pref.plugins.records`) whose rows hold

- `conversation`: the messages, `{"role": "user" | "assistant", "content": ...}`;
- `openai_moderation`: one entry per message, each with a bool `flagged`;
- `language`: the conversation's language name ("English", ...; rows without one are kept);

and other fields (`turn`, `model`, `redacted`, ...) that are ignored.

Every user message followed by an assistant message is one example: the
prompt is the conversation up to and including the user message (a plain
string for the first turn), the answer is the assistant message. The label
comes from the moderation of the answer (flagged: rejected) by default, or
from a reward plugin with `label_from="reward:NAME"` (reward >= threshold:
accepted).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pref.errors import PrefError
from pref.examples import LabeledExample, Prompt
from pref.hookspecs import hookimpl
from pref.plugins.records import FILE_TYPES, messages, read_records

log = logging.getLogger(__name__)

HUB_HINT = "lmsys-chat-1m is gated on the hub: accept its licence there, download it, and pass the local file or folder as path"
REWARD_PREFIX = "reward:"


class LmsysChat:
    """Prompt/response examples from lmsys-chat-1m conversations, labelled by moderation flags or a reward.

    Options:
        path: a local lmsys-chat-1m file (JSONL, JSON, Parquet) or folder; a hub name is tried but the hub copy is gated.
        language: keep conversations in this language only (default "English"; "" keeps all); rows
            without a `language` (exports often drop the column) are kept, with a warning.
        limit: at most this many examples (default: all).
        max_turns: use at most the first this many user turns of each conversation (default: all).
        label_from: "moderation" (default: a flagged answer is rejected) or "reward:NAME" (a reward plugin).
        threshold: with a reward, the score an answer needs to be accepted (default: the reward's own pass mark).
        reward_options: options of that reward plugin.
        split: the split to read from a dataset folder or the hub (default "train").
    """

    def __init__(
        self,
        path: str,
        language: str | None = "English",
        limit: int | None = None,
        max_turns: int | None = None,
        label_from: str = "moderation",
        threshold: float | None = None,
        reward_options: dict[str, Any] | None = None,
        split: str = "train",
        registry: Any = None,
    ):
        # checked here, before the model loads, so a typo fails at once
        local = os.path.expanduser(path)
        looks_local = path.startswith((".", "/", "~")) or os.path.splitext(local)[1].lower() in FILE_TYPES
        if looks_local and not os.path.exists(local):
            raise PrefError(f"lmsys: no such file or folder {path!r}")
        for name, value in (("limit", limit), ("max_turns", max_turns)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PrefError(f"lmsys: {name} must be a positive whole number, not {value!r}")
        if label_from != "moderation" and not (label_from.startswith(REWARD_PREFIX) and label_from[len(REWARD_PREFIX) :]):
            raise PrefError(f"lmsys: label_from must be 'moderation' or 'reward:NAME' (a reward plugin), not {label_from!r}")
        if label_from == "moderation" and (threshold is not None or reward_options):
            raise PrefError("lmsys: threshold and reward_options only apply with label_from='reward:NAME'")
        self.path = path
        self.language = language or None
        self.limit = limit
        self.max_turns = max_turns
        self.label_from = label_from
        self.threshold = threshold
        self.reward_options = dict(reward_options or {})
        self.split = split
        self.registry = registry  # builds the labelling reward; passed by the host
        if label_from != "moderation" and registry is None:
            raise PrefError("lmsys: label_from='reward:NAME' builds a reward plugin: build lmsys with registry.create, which passes registry=")

    def build(self, policy=None) -> list[LabeledExample]:
        """Read the conversations and label their turns; `policy` is not needed."""
        examples = self._read()
        if not examples:
            language = f" in {self.language}" if self.language else ""
            raise PrefError(f"{self.path}: no user turn answered by the assistant{language}; expected lmsys-chat-1m rows with a 'conversation'")
        if self.label_from.startswith(REWARD_PREFIX):
            self._label_by_reward(examples)
        return examples

    def _rows(self) -> Any:
        try:
            return read_records(self.path, self.split)
        except PrefError as exc:
            if os.path.exists(os.path.expanduser(self.path)):
                raise
            raise PrefError(f"{exc}; {HUB_HINT}") from None

    def _read(self) -> list[LabeledExample]:
        moderated = self.label_from == "moderation"
        examples: list[LabeledExample] = []
        unknown_language = 0
        for number, row in enumerate(self._rows(), start=1):
            where = f"{self.path} row {number}"
            if not isinstance(row, dict):
                raise PrefError(f"{where}: expected an object with named fields, got {type(row).__name__}")
            if self.language is not None:
                # exports often drop the column: keeping every row beats finding "no English row"
                if row.get("language") in (None, ""):
                    unknown_language += 1
                elif row["language"] != self.language:
                    continue
            if row.get("conversation") is None:
                raise PrefError(f"{where}: missing field 'conversation' (a list of {{'role', 'content'}} messages)")
            conversation = messages(row["conversation"], "conversation", where)
            flags = moderation_flags(row, len(conversation), where) if moderated else None
            for prompt, answer_index in user_turns(conversation, self.max_turns):
                answer = conversation[answer_index]["content"]
                if not answer.strip():
                    continue  # nothing to learn from an empty answer
                # a label is filled in by the reward later when not from moderation
                examples.append(LabeledExample(prompt, answer, not flags[answer_index] if flags is not None else True))
                if self.limit is not None and len(examples) >= self.limit:
                    break
            if self.limit is not None and len(examples) >= self.limit:
                break
        if unknown_language:
            log.warning(f"{self.path}: {unknown_language} conversations have no 'language'; kept them all "
                        f"rather than only {self.language} ones (pass --dataset-option language= to keep all silently)")
        return examples

    def _label_by_reward(self, examples: list[LabeledExample], batch_size: int = 64) -> None:
        name = self.label_from[len(REWARD_PREFIX) :]
        reward = self.registry.create("reward", name, self.reward_options)
        if reward.columns or reward.reads_completion_ids:
            what = f"the columns {', '.join(reward.columns)} of a prompt's row" if reward.columns else "the sampled token ids of each completion"
            raise PrefError(f"lmsys: reward {name!r} reads {what}, which lmsys conversations do not have; label with another reward")
        threshold = self.threshold if self.threshold is not None else reward.quality_threshold
        if threshold is None:
            raise PrefError(f"lmsys: reward {name!r} has no pass mark of its own; pass --dataset-option threshold=VALUE")
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            scores = reward.score([e.prompt for e in chunk], [e.completion for e in chunk])
            if "reward" not in scores:
                raise PrefError(f"reward {name!r} gave no score named 'reward' (it gave {', '.join(scores) or 'none'})")
            for example, value in zip(chunk, scores["reward"].tolist()):
                example.label = value >= threshold


def user_turns(conversation: list[dict], max_turns: int | None = None) -> list[tuple[Prompt, int]]:
    """(prompt, index of the answer) for each user message the assistant answers next.

    The prompt is every message up to and including the user's: the text alone
    for the first message of a conversation, a message list otherwise.
    """
    turns: list[tuple[Prompt, int]] = []
    for i, message in enumerate(conversation[:-1]):
        if message["role"] != "user" or conversation[i + 1]["role"] != "assistant":
            continue
        if max_turns is not None and len(turns) >= max_turns:
            break
        prompt: Prompt = message["content"] if i == 0 else conversation[: i + 1]
        turns.append((prompt, i + 1))
    return turns


def moderation_flags(row: dict, messages: int, where: str) -> list[bool]:
    """The `flagged` of each message's `openai_moderation` entry: [messages] bools."""
    moderation = row.get("openai_moderation")
    if moderation is None:
        raise PrefError(f"{where}: missing field 'openai_moderation' (needed to label by moderation; or use label_from='reward:NAME')")
    if not isinstance(moderation, list) or len(moderation) != messages:
        got = f"{len(moderation)} entries" if isinstance(moderation, list) else type(moderation).__name__
        raise PrefError(f"{where}: bad field 'openai_moderation': expected one entry per message ({messages}), got {got}")
    flags = []
    for entry in moderation:
        flagged = entry.get("flagged") if isinstance(entry, dict) else None
        if not isinstance(flagged, (bool, int)):
            raise PrefError(f"{where}: bad field 'openai_moderation': every entry needs a true/false 'flagged'")
        flags.append(bool(flagged))
    return flags


@hookimpl
def register_dataset_builders(register):
    register("lmsys", LmsysChat)
