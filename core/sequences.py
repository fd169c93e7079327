"""Token rows and the log-probs computed over them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    """B prompt+completion rows, right padded.

    input_ids:       [B, T] token ids
    attention_mask:  [B, T] 1 on real tokens, 0 on padding
    completion_mask: [B, T] 1 on completion tokens only (prompt and padding are 0)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Sequences":
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    def select(self, index: torch.Tensor | list[int]) -> "Sequences":
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return Sequences(self.input_ids[index], self.attention_mask[index], self.completion_mask[index])

    def keys(self) -> list[str]:
        """A content hash per row (the real tokens and which are completion), for caches."""
        out = []
        for ids, att, comp in zip(self.input_ids.tolist(), self.attention_mask.tolist(), self.completion_mask.tolist()):
            real = [(i, c) for i, a, c in zip(ids, att, comp) if a]
            out.append(hashlib.sha1(repr(real).encode()).hexdigest())
        return out

    @staticmethod
    def concat(parts: list["Sequences"], pad_id: int = 0) -> "Sequences":
        """Stack rows of several `Sequences`, right-padding to the longest."""
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Sequences(
            torch.cat([pad(p.input_ids, pad_id) for p in parts]),
            torch.cat([pad(p.attention_mask, 0) for p in parts]),
            torch.cat([pad(p.completion_mask, 0) for p in parts]),
        )


@dataclass
class Logps:
    """Log-probs of the completion tokens of some `Sequences`.

    tokens:   [B, T] log p(token_t | tokens_<t), 0 where `mask` is 0
    mask:     [B, T] the completion mask the log-probs were taken over
    sequence: [B]    sum of `tokens` over the completion
    logits:   [B, T, V] or None; logits[:, t] predicts token t (row 0 is unused)
    hidden:   [B, T, H] or None; the last layer's hidden state at each position
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    sequence: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """Per-token average log-prob [B]."""
        return self.sequence / self.mask.sum(-1).clamp(min=1)

    def select(self, index: torch.Tensor | slice) -> "Logps":
        return Logps(
            self.tokens[index],
            self.mask[index],
            self.sequence[index],
            None if self.logits is None else self.logits[index],
            None if self.hidden is None else self.hidden[index],
        )


def logps_from_logits(logits: torch.Tensor, sequences: Sequences, keep_logits: bool = False) -> Logps:
    """Gather the log-prob of each completion token from a model's logits.

    logits: [B, T, V], where logits[:, t] predicts token t + 1 (the usual causal LM output).
    Returns `Logps` aligned to token positions: tokens[:, t] is log p(input_ids[:, t]).
    """
    ids = sequences.input_ids
    mask = sequences.completion_mask.clone()
    mask[:, 0] = 0  # the first token has no prefix to be predicted from
    shifted = logits[:, :-1].float()
    # gather-then-normalise: avoids materialising a second [B, T, V] log-softmax tensor
    picked = torch.gather(shifted, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(shifted, dim=-1)
    token_logps = torch.nn.functional.pad(token_logps, (1, 0), value=0.0) * mask
    aligned_logits = None
    if keep_logits:
        aligned_logits = torch.nn.functional.pad(logits[:, :-1], (0, 0, 1, 0))
    return Logps(token_logps, mask, token_logps.sum(-1), aligned_logits)
