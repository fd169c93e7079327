"""TPO: triple preference optimization (TRL 1.16's `trl.experimental.tpo`).

Saeidi et al. 2024 (https://arxiv.org/abs/2405.16681): each prompt has a chosen, a rejected
and a gold answer. A reference-free preference loss on the chosen and rejected answers
(as CPO's: sigmoid, hinge or IPO, or TPO-L, the per-token average with a target margin)
plus `tpo_alpha` times the gold answers' NLL. The data is read by the
`triple-preferences` builder: prompt/chosen/rejected rows with a `reference` column.
"""

from __future__ import annotations

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, PAIRS, Objective, ObjectiveNeeds, PairBatch, Policy, Reference
from pref.plugins.cpo import cpo_loss
from pref.plugins.dpo import pair_metrics
from pref.plugins.sft import sft_loss
from pref.sequences import Sequences

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")
#: Loss types scored on per-token average log-probs; the others on sums (as TRL's TPO).
AVERAGED_LOSS_TYPES = ("ipo", "tpo-l")


def tpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.01, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, tpo_l_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair TPO losses and rewards (beta x the log-probs), as TRL's `TPOTrainer`.

    chosen_logps, rejected_logps: [B], summed over each answer's tokens, or per-token averages
    for the AVERAGED_LOSS_TYPES. "tpo-l" is the sigmoid loss on the margin less tpo_l_gamma / beta:
    CPO's simpo with gamma tpo_l_gamma.
    """
    if loss_type not in LOSS_TYPES:
        raise PrefError(f"unknown TPO loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    return cpo_loss(chosen_logps, rejected_logps, beta, "simpo" if loss_type == "tpo-l" else loss_type, label_smoothing, tpo_l_gamma)


class TPO(Objective):
    """TPO: a chosen, a rejected and a gold answer per prompt; no reference model (TRL's TPOTrainer).

    Options (TRL's `TPOConfig` names):
        loss_type: "sigmoid" (default), "hinge", "ipo" or "tpo-l" (length-normalised, with a margin).
        beta: inverse temperature (default 0.01, TRL's).
        label_smoothing: label noise for sigmoid and tpo-l (0).
        tpo_alpha: weight of the gold answers' NLL, a mean over their tokens (1.0; 0: no NLL term).
        tpo_l_gamma: TPO-L's target reward margin (0.5).
    """

    needs = ObjectiveNeeds(reference=NO_REFERENCE, data=PAIRS, dataset_builder="triple-preferences")

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.01, label_smoothing: float = 0.0, tpo_alpha: float = 1.0,
                 tpo_l_gamma: float = 0.5):
        if loss_type not in LOSS_TYPES:
            raise PrefError(f"unknown TPO loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if beta <= 0:
            raise PrefError(f"tpo: beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise PrefError(f"tpo: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type not in ("sigmoid", "tpo-l"):
            raise PrefError(f"tpo: label_smoothing only applies to loss_type sigmoid or tpo-l, not {loss_type!r}; set it to 0")
        if tpo_alpha < 0:
            raise PrefError(f"tpo: tpo_alpha (the gold answers' NLL weight) must not be negative, got {tpo_alpha}")
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.tpo_alpha, self.tpo_l_gamma = tpo_alpha, tpo_l_gamma

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean TPO loss + tpo_alpha x the gold answers' NLL, from one forward pass over the 3B rows, with TRL's metrics."""
        if batch.gold is None:
            raise PrefError("tpo learns from a gold answer per pair: read the data with the triple-preferences builder (a 'reference' column)")
        n, pad_id = len(batch), policy.tokenizer.pad_token_id
        rows = [batch.chosen, batch.rejected, *([batch.gold] if self.tpo_alpha else [])]
        logps = policy.logps(Sequences.concat(rows, pad_id=0 if pad_id is None else pad_id))
        chosen, rejected = logps.select(slice(0, n)), logps.select(slice(n, 2 * n))
        averaged = self.loss_type in AVERAGED_LOSS_TYPES
        chosen_logps = chosen.mean if averaged else chosen.sequence
        rejected_logps = rejected.mean if averaged else rejected.sequence
        losses, chosen_rewards, rejected_rewards = tpo_loss(chosen_logps, rejected_logps, self.beta, self.loss_type,
                                                            self.label_smoothing, self.tpo_l_gamma)
        loss = losses.mean()
        metrics = pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
        if self.tpo_alpha:
            gold = logps.select(slice(2 * n, None))
            nll = sft_loss(gold.tokens, gold.mask)
            metrics["nll_loss"] = nll.item()
            loss = loss + self.tpo_alpha * nll
        return loss, metrics


@hookimpl
def register_objectives(register):
    register("tpo", TPO)
