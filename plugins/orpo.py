"""ORPO: odds-ratio preference optimisation, SFT and preference in one reference-free loss (Hong et al. 2024).

https://arxiv.org/abs/2403.07691. The loss is the NLL of the chosen answers plus lambda
(TRL's `beta`) times -log sigmoid of the log odds ratio between the chosen and the
rejected answer, with odds(y) = P(y) / (1 - P(y)) over per-token average log-probs.
Matches TRL 1.16's `trl.experimental.orpo.ORPOTrainer`, except that the NLL is over the chosen
answer's tokens, as in the paper, where TRL's counts the prompt's tokens too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, PAIRS, Objective, ObjectiveNeeds, PairBatch, Policy, Reference
from pref.plugins.dpo import pair_logps, pair_metrics
from pref.plugins.sft import sft_loss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair odds-ratio losses (Eq. 7 of the paper, times lambda), rewards and the log odds.

    Args:
        policy_chosen_logps: [B] per-token AVERAGE log-probs of the chosen answers (so P(y) < 1 stays meaningful).
        policy_rejected_logps: [B] the same for the rejected answers.
        beta: the paper's lambda, the weight of the odds-ratio term against the NLL.

    Returns:
        losses: [B] -beta * log sigmoid(log odds(chosen) - log odds(rejected)); the full ORPO
            loss is the chosen NLL plus their mean (TRL's `policy_nll_loss - losses.mean()`
            with its sign convention).
        chosen_rewards: [B] beta * chosen log-probs, detached.
        rejected_rewards: [B] the same for the rejected answers.
        log_odds: [B] log odds(chosen) - log odds(rejected), detached (TRL's `log_odds_chosen` is its mean,
            `log_odds_ratio` the mean of log sigmoid of it).
    """
    if beta <= 0:
        raise PrefError(f"orpo: beta (the paper's lambda) must be positive, got {beta}")
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach(), log_odds.detach()


class ORPO(Objective):
    """ORPO: the chosen answers' NLL plus an odds-ratio preference term, no reference (Hong et al. 2024).

    Options:
        beta: the paper's lambda, the weight of the odds-ratio term (default 0.1, TRL's name and default).
    """

    needs = ObjectiveNeeds(reference=NO_REFERENCE, data=PAIRS)

    def __init__(self, beta: float = 0.1):
        if not isinstance(beta, (int, float)) or beta <= 0:
            raise PrefError(f"orpo: beta (the paper's lambda) must be a positive number, got {beta!r}")
        self.beta = beta

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """NLL of the chosen completion tokens + mean odds-ratio loss, with TRL's ORPO metrics."""
        chosen, rejected, _, _ = pair_logps(policy, None, batch)
        nll = sft_loss(chosen.tokens, chosen.mask)
        losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen.mean, rejected.mean, self.beta)
        metrics = {
            **pair_metrics(chosen_rewards, rejected_rewards, chosen.mean, rejected.mean),
            "nll_loss": nll.item(),
            "log_odds_ratio": F.logsigmoid(log_odds).mean().item(),
            "log_odds_chosen": log_odds.mean().item(),
        }
        return nll + losses.mean(), metrics


@hookimpl
def register_objectives(register):
    register("orpo", ORPO)
