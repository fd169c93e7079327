"""The `simpo` objective: SimPO, Meng et al. 2024 (https://arxiv.org/abs/2405.14734).

SimPO needs no reference model. Its implicit reward is the policy's
*average* log-prob per completion token, scaled by beta, so a long answer is
not favoured just for having more tokens; the loss asks the chosen answer's
reward to beat the rejected one's by a margin gamma (Eq. 6 of the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pref import Objective, ObjectiveNeeds, PairBatch, Policy, PrefError, Reference, hookimpl
from pref.plugins.dpo import pair_logps


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and rewards.

    Args:
        policy_chosen_logps: [B] per-token average log-probs of the chosen completions.
        policy_rejected_logps: [B] the same for the rejected completions.
        beta: scale of the rewards.
        gamma: the margin the chosen reward must beat the rejected one by.

    Returns:
        losses: [B] -log sigmoid(beta * (chosen - rejected) - gamma), one per pair.
        chosen_rewards: [B] beta * chosen log-probs, detached.
        rejected_rewards: [B] beta * rejected log-probs, detached.
    """
    margin = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -F.logsigmoid(margin)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


class SimPO(Objective):
    """SimPO: reference-free preference optimization on per-token average log-probs.

    Options:
        beta: scale of the rewards (default 2.0; the paper uses 2 to 10).
        gamma_beta_ratio: the target margin as a share of beta, gamma = gamma_beta_ratio x beta
            (default 0.5; the paper uses 0.3 to 0.8).
    """

    needs = ObjectiveNeeds(reference="none", data="pairs")  # the loop loads no reference model

    def __init__(self, beta: float = 2.0, gamma_beta_ratio: float = 0.5):
        if beta <= 0:
            raise PrefError(f"simpo: beta must be positive, got {beta}")
        if gamma_beta_ratio < 0:
            raise PrefError(f"simpo: gamma_beta_ratio must not be negative, got {gamma_beta_ratio}")
        self.beta = beta
        self.gamma = gamma_beta_ratio * beta

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean SimPO loss over the pairs, and reward metrics named as DPO's are."""
        chosen, rejected, _, _ = pair_logps(policy, None, batch)  # one forward pass over the 2B rows
        losses, chosen_rewards, rejected_rewards = simpo_loss(chosen.mean, rejected.mean, self.beta, self.gamma)
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen.mean.detach().mean().item(),
            "logps/rejected": rejected.mean.detach().mean().item(),
        }
        return losses.mean(), metrics


@hookimpl
def register_objectives(register):
    register("simpo", SimPO)
