"""SFT: supervised fine-tuning on prompt/completion pairs, the loss on the completion tokens only.

The usual recipe is SFT first, then preferences; `sft` lets one tool do both. The loss
is TRL 1.16's `SFTTrainer` loss: the negative log-likelihood summed over every
completion token of the batch and divided by their number (`nll`), or DFT's
probability-weighted version (`dft`, Wu et al. 2025, https://arxiv.org/abs/2508.05629).
"""

from __future__ import annotations

from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import ConversationExample, LabeledExample, Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, SETS, LabeledBatch, Objective, ObjectiveNeeds, Policy, Reference
from pref.plugins.labeled_data import row_examples
from pref.plugins.records import messages, read_records

LOSS_TYPES = ("nll", "dft")


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, loss_type: str = "nll") -> torch.Tensor:
    """Mean per-token loss over all completion tokens of the batch: [].

    Args:
        token_logps: [B, T] log p(token t | tokens before it), with grad.
        mask: [B, T] 1 on the completion tokens the loss covers.
        loss_type: "nll" (-log p) or "dft" (-p * log p with p detached).
    """
    if loss_type not in LOSS_TYPES:
        raise PrefError(f"unknown SFT loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    per_token = -token_logps * mask
    if loss_type == "dft":
        per_token = per_token * token_logps.detach().exp()
    return per_token.sum() / mask.sum().clamp(min=1)


FORMATS = "expected prompt and completion, a messages list ending in an assistant turn, or prompt/chosen/rejected"


TURNS = ("last", "all")


def completion_examples(row: dict, where: str, turns: str = "last") -> list[LabeledExample | ConversationExample]:
    """The answers one row teaches: prompt/completion, conversational `messages`, or a preference row's chosen answer.

    A row with a `label` counts only when the label is accepted (an unlabelled row counts). `turns` "all": each
    answer is a `ConversationExample` in which every assistant turn is learnt (a prompt/completion row: one turn).
    """
    if isinstance(row.get("messages"), list):
        conversation = messages(row["messages"], "messages", where)
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise PrefError(f"{where}: bad field 'messages': the last message must be the assistant's answer, after at least one other")
        if turns == "all":
            return [ConversationExample(conversation)]
        return [LabeledExample(conversation[:-1], conversation[-1]["content"], True)]
    if turns == "all":
        return [ConversationExample(as_messages(e.prompt) + [{"role": "assistant", "content": e.completion}])
                for e in completion_examples(row, where)]
    has_answer = row.get("completion") is not None or row.get("response") is not None
    if has_answer and row.get("label") in (None, ""):  # plain SFT data: every answer is one to learn
        row = {**row, "label": True}
    try:
        examples = row_examples(row, where)
    except PrefError as exc:
        raise PrefError(f"{exc}; the sft builder {FORMATS}") from None
    return [LabeledExample(e.prompt, e.completion, True) for e in examples if e.label]


def as_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages: a plain text is one user turn, as a chat template would take it."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class CompletionData:
    """The `completions` dataset builder: prompts with the answers to learn, for `sft`.

    Rows (JSONL, JSON, CSV, Parquet, a saved folder or a hub name): `prompt` (text or
    messages) and `completion` (or `response`); or `messages`, a conversation whose last
    message is the assistant's answer; or prompt/chosen/rejected, whose chosen answer is
    learnt. A row with a `label` is learnt only when the label is accepted.

    Option `turns`: "last" (default) learns a conversation's last answer; "all" every assistant
    turn of it, in one row, each given the turns before it (TRL's `assistant_only_loss`).
    """

    def __init__(self, path: str, split: str = "train", limit: int | None = None, turns: str = "last"):
        if limit is not None and limit < 1:
            raise PrefError(f"completions: limit must be a positive number of rows, not {limit}")
        if turns not in TURNS:
            raise PrefError(f"completions: turns must be last (a conversation's last answer) or all (every assistant turn), not {turns!r}")
        self.path, self.split, self.limit, self.turns = path, split, limit, turns

    def build(self, policy: Any = None) -> list[LabeledExample | ConversationExample]:
        examples: list[LabeledExample | ConversationExample] = []
        for number, row in enumerate(read_records(self.path, self.split), start=1):
            where = f"{self.path} row {number}"
            if not isinstance(row, dict):
                raise PrefError(f"{where}: expected an object with named fields, got {type(row).__name__}")
            examples.extend(completion_examples(row, where, self.turns))
            if self.limit is not None and len(examples) >= self.limit:
                return examples[: self.limit]
        if not examples:
            raise PrefError(f"{self.path}: no answers to learn; {FORMATS}")
        return examples


class SFT(Objective):
    """Supervised fine-tuning: the NLL of the completions given their prompts (TRL's SFTTrainer, completion-only).

    Reads `--dataset FILE` with the `completions` builder (prompt/completion, messages, or a
    preference file's chosen answers). Rows labelled rejected (a `labeled` dataset) are skipped.

    Options:
        loss_type: "nll" (default) or "dft" (each token's NLL weighted by its probability).
    """

    needs = ObjectiveNeeds(reference=NO_REFERENCE, data=SETS, dataset_builder="completions", dropout=True)  # TRL's SFT keeps it

    def __init__(self, loss_type: str = "nll"):
        if loss_type not in LOSS_TYPES:
            raise PrefError(f"unknown SFT loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        self.loss_type = loss_type

    def loss_items(self, batch: LabeledBatch) -> int:
        """The answer tokens the loss averages over: the accepted rows' completion tokens after the first position."""
        return int(batch.sequences.completion_mask[batch.labels.bool(), 1:].sum())

    def loss(self, policy: Policy, reference: Reference | None, batch: LabeledBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean token NLL over the accepted rows' completions; metric: the mean token log-prob (the loop logs TRL's `num_tokens`)."""
        keep = batch.labels.bool()
        sequences = batch.sequences if bool(keep.all()) else batch.sequences.select(torch.nonzero(keep).flatten())
        if len(sequences) == 0:
            raise PrefError("sft: a batch held no accepted answer to learn; the data has rows labelled rejected only")
        out = policy.logps(sequences)
        loss = sft_loss(out.tokens, out.mask, self.loss_type)
        return loss, {"logps/mean": (out.tokens.detach().sum() / out.mask.sum().clamp(min=1)).item()}


@hookimpl
def register_objectives(register):
    register("sft", SFT)


@hookimpl
def register_dataset_builders(register):
    register("completions", CompletionData)
