"""SFT: supervised fine-tuning on prompt/completion pairs, the loss on the completion tokens only.

The usual recipe is SFT first, then preferences; `sft` lets one tool do both. The loss
is TRL 1.16's `SFTTrainer` loss: the negative log-likelihood summed over every
completion token of the batch and divided by their number (`nll`), or DFT's
probability-weighted version (`dft`, Wu et al. 2025, https://arxiv.org/abs/2508.05629).
"""

from __future__ import annotations

import torch

from pref.errors import PrefError

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
