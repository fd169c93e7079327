"""RLOO: REINFORCE with a leave-one-out baseline over K samples per prompt (Ahmadian et al. 2024).

https://arxiv.org/abs/2402.14740. Each sample's advantage is its reward minus the mean
reward of the prompt's other K - 1 samples; the reward includes a KL penalty
beta * sum over tokens of (log pi_old - log pi_ref), and the policy takes PPO's clipped
step on whole-sequence ratios, as TRL 1.16's `RLOOTrainer` computes it.
"""

from __future__ import annotations

import torch

from pref.errors import PrefError


def leave_one_out_advantages(rewards: torch.Tensor, samples_per_prompt: int, normalize: bool = False) -> torch.Tensor:
    """Each reward minus the mean of the other samples of its prompt: [P * K].

    Args:
        rewards: [P * K] rewards (KL penalty included), the K samples of each prompt consecutive.
        samples_per_prompt: K, at least 2.
        normalize: then standardise over the batch: (a - mean) / (std + 1e-4) (TRL's `normalize_advantages`).
    """
    if samples_per_prompt < 2:
        raise PrefError(f"rloo needs at least 2 samples per prompt for a leave-one-out baseline, got {samples_per_prompt}")
    grouped = rewards.view(-1, samples_per_prompt)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (samples_per_prompt - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return advantages


def kl_penalised_rewards(
    rewards: torch.Tensor, old_token_logps: torch.Tensor, reference_token_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards - beta * sum over completion tokens of (log pi_old - log pi_ref), the k1 estimate.

    rewards: [B]; old_token_logps, reference_token_logps, mask: [B, T].
    Returns the penalised rewards [B] and the per-token KL [B, T] (TRL logs its token mean as `kl`).
    """
    per_token_kl = (old_token_logps - reference_token_logps) * mask
    return rewards - beta * per_token_kl.sum(-1), per_token_kl


def rloo_loss(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss on whole-sequence ratios, as `RLOOTrainer._compute_loss`.

    Args:
        policy_logps: [B] summed completion log-probs under the policy (with grad).
        old_logps: [B] the same under the policy that sampled them.
        advantages: [B] (see `leave_one_out_advantages`).
        epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] of the ratio.

    Returns:
        loss: [] mean over samples of -min(ratio * A, clip(ratio) * A).
        stats: "ratio" [B], and "low_clipped", "high_clipped" [B] bool for TRL's clip_ratio metrics.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(policy_logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    stats = {
        "ratio": ratio.detach(),
        "low_clipped": (ratio < 1 - epsilon) & (advantages < 0),
        "high_clipped": (ratio > 1 + epsilon_high) & (advantages > 0),
    }
    return loss, stats
