"""PPO with a KL penalty to a reference, for causal LMs (Ziegler et al. 2019, arXiv 1909.08593).

Each rollout is K sampled completions for each of P prompts, scored by the
reward. A completion token's reward is the KL penalty -kl_coef x KL(policy ||
reference) at that token, plus the reward's score on the last completion
token. A value head on the policy's last hidden state estimates returns; GAE
turns rewards and values into advantages, and the policy and the value head
are trained on the clipped PPO losses for several epochs of mini-batches per
rollout. The KL coefficient is fixed, or steered towards a target KL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import REFERENCE_LOGPS, SAMPLES, Minibatch, Objective, ObjectiveNeeds, Policy, Processes, Reference, ScoredBatch
from pref.sequences import Sequences

KL_ESTIMATORS = ("k1", "k3")


# -- the maths, on plain tensors ---------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (any shape; 0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shift and scale `values` to mean 0 and variance 1 over the masked entries; 0 elsewhere.

    The variance is the unbiased one (divided by n - 1), as TRL's `masked_whiten`.
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    n = mask.sum()
    variance = (((values - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def kl_penalty(logps: torch.Tensor, reference_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(policy || reference) from the sampled tokens' log-probs [B, T].

    k1 = logp - ref_logp: unbiased, but negative on some tokens.
    k3 = (r - 1) - log r with r = exp(ref_logp - logp): unbiased and never negative
    (Schulman 2020, "Approximating KL divergence").
    """
    if estimator == "k1":
        return logps - reference_logps
    if estimator == "k3":
        log_ratio = reference_logps - logps
        return torch.expm1(log_ratio) - log_ratio
    raise PrefError(f"unknown kl_estimator {estimator!r}: choose one of {', '.join(KL_ESTIMATORS)}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef x kl on each completion token, plus the score [B] on the last one."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(-1)  # the last completion token of each row
    has_tokens = (mask.sum(-1) > 0).to(kl.dtype)
    rewards[torch.arange(len(scores)), last] += scores.to(kl.dtype) * has_tokens
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the completion tokens of each row.

    rewards, values, mask: [B, T]; values[:, t] estimates the return from token t on.
    Each row's completion tokens are consecutive and the episode ends after the last one:
        delta_t = r_t + gamma x V_{t+1} - V_t        (V after the last token is 0)
        A_t     = delta_t + gamma x lam x A_{t+1}
    Returns advantages and returns (A + V), both [B, T] and 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        following = mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        next_value = values[:, t + 1] * following if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * following * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss, the mean over completion tokens, and the share of tokens clipped.

    ratio = exp(logp - old_logp); loss = max(-A x ratio, -A x clip(ratio, 1 - c, 1 + c)).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, 0.5 x the mean over tokens of max((V - R)^2, (V_clip - R)^2), and the share clipped.

    V_clip = old_V + clip(V - old_V, -c, c): the value may not move further than c from the rollout's.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask)


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2), steered towards a target KL.

    After each rollout with mean KL `kl` over `n_steps` samples:
        e = clip(kl / target - 1, -0.2, 0.2);   kl_coef *= 1 + e x n_steps / horizon
    so a KL above the target raises the penalty, one below lowers it. With `target`
    None the coefficient stays fixed.
    """

    def __init__(self, kl_coef: float, target: float | None, horizon: float):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# -- the objective ---------------------------------------------------------------------------


@dataclass
class PreparedRollout:
    """A rollout with everything PPO trains on, computed once before its first update.

    sequences: the B rows; logps: [B, T] the sampling policy's token log-probs; values: [B, T]
    its value estimates; advantages: [B, T] whitened; returns: [B, T]. All on the policy's device. temperature: the
    sampling temperature, at which the log-probs are taken (`ScoredBatch.temperature`, as TRL's PPOTrainer did).
    """

    sequences: Sequences
    logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    metrics: dict[str, float]
    temperature: float = 1.0

    def select(self, rows: torch.Tensor) -> "PreparedRollout":
        rows = rows.to(self.logps.device)
        return PreparedRollout(self.sequences.select(rows), self.logps[rows], self.values[rows], self.advantages[rows], self.returns[rows],
                               self.metrics, self.temperature)


class PPO(Objective):
    """PPO with a KL penalty to the reference and a value head, on K samples per prompt.

    Options:
        beta: the KL coefficient (`--beta`), the starting one when adaptive (default 0.05).
        target_kl: the KL per sample the coefficient is steered towards (default 6.0);
            none (`-o target_kl=none`) keeps the coefficient fixed.
        horizon: how slowly the coefficient adapts, in samples (default 10000).
        kl_estimator: "k1" (logp - ref_logp, default) or "k3" (never negative).
        gamma, lam: GAE's discount and smoothing (defaults 1.0 and 0.95).
        cliprange: how far the probability ratio may move from 1 (default 0.2).
        cliprange_value: how far a value may move from the rollout's (default 0.2).
        vf_coef: the weight of the value loss (default 0.1).
        ppo_epochs: passes over each rollout (default 4).
        minibatches: mini-batches per pass; each is one optimizer step (default 1).
        whiten_advantages: whiten advantages over each rollout (default True).
    """

    needs = ObjectiveNeeds(
        reference=REFERENCE_LOGPS,
        data=SAMPLES,
        online=True,
        samples_per_prompt=4,
        dataset_builder="prompts",  # a .txt file goes to the `text` builder: continuations of its lines' first words
        reward="repetition",
        trainable_modules=True,  # the value head
        dropout=True,  # as TRL's RL trainers
    )

    def __init__(
        self,
        beta: float = 0.05,
        target_kl: float | str | None = 6.0,  # str: none, null or fixed (a TOML file has no null)
        horizon: float = 10000,
        kl_estimator: str = "k1",
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 4,
        minibatches: int = 1,
        whiten_advantages: bool = True,
        processes: Processes | None = None,
    ):
        if isinstance(target_kl, str) and target_kl.lower() in ("none", "null", "fixed"):
            target_kl = None  # a TOML file has no null
        if kl_estimator not in KL_ESTIMATORS:
            raise PrefError(f"ppo: unknown kl_estimator {kl_estimator!r}: choose one of {', '.join(KL_ESTIMATORS)}")
        if beta < 0:
            raise PrefError(f"ppo: beta must not be negative, got {beta}")
        if target_kl is not None and (isinstance(target_kl, str) or target_kl <= 0):
            raise PrefError(f"ppo: target_kl must be positive (or none for a fixed coefficient), got {target_kl}")
        if horizon <= 0:
            raise PrefError(f"ppo: horizon must be positive, got {horizon}")
        if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
            raise PrefError(f"ppo: gamma and lam must lie in [0, 1], got {gamma} and {lam}")
        if cliprange <= 0 or cliprange_value <= 0 or vf_coef < 0:
            raise PrefError("ppo: cliprange and cliprange_value must be positive, vf_coef not negative")
        if not isinstance(ppo_epochs, int) or not isinstance(minibatches, int) or ppo_epochs < 1 or minibatches < 1:
            raise PrefError(f"ppo: ppo_epochs and minibatches must be whole numbers of at least 1, got {ppo_epochs} and {minibatches}")
        self.kl = AdaptiveKLController(beta, target_kl, horizon)
        self.kl_estimator = kl_estimator
        self.gamma, self.lam = gamma, lam
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.needs = replace(self.needs, epochs_per_rollout=ppo_epochs, minibatches_per_rollout=minibatches)
        self.whiten_advantages = whiten_advantages
        self.processes = processes or Processes()  # the loop's, for the mean KL across processes
        self.value_head: torch.nn.Linear | None = None

    def setup(self, policy: Policy) -> None:
        self.value_head = torch.nn.Linear(policy.model.config.hidden_size, 1)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"value_head": self.value_head}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed by the loop: the adapted KL coefficient."""
        return {"kl_coef": self.kl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.value = state["kl_coef"]

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Value estimates [B, T] from the last hidden states [B, T, H].

        values[:, t] is read from the hidden state before token t, the state in which it was chosen.
        """
        weight = self.value_head.weight
        head = self.value_head(hidden[:, :-1].to(weight.dtype)).squeeze(-1).float()
        return torch.nn.functional.pad(head, (1, 0))

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> PreparedRollout:
        """Old log-probs and values, per-token rewards, GAE advantages and returns, once per rollout.

        Also updates the adaptive KL coefficient from this rollout's KL.
        """
        if reference is None:
            raise PrefError("ppo needs a reference model for its KL penalty; do not pass --reference none")
        policy_out = policy.logps(batch.sequences, with_hidden=True, temperature=batch.temperature)
        mask = policy_out.mask
        logps = policy_out.tokens.float()
        values = self.values(policy_out.hidden) * mask
        reference_logps = reference.logps(batch.sequences, temperature=batch.temperature).tokens.to(logps.device).float()
        kl = kl_penalty(logps, reference_logps, self.kl_estimator) * mask
        scores = batch.scores["reward"].to(logps.device)
        kl_coef = self.kl.value
        rewards = token_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        raw_advantages = advantages
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        kl_per_sample = self.processes.mean(kl.sum(-1).mean())  # every process steers the same coefficient
        self.kl.update(kl_per_sample.item(), len(batch) * self.processes.world)
        metrics = {
            "objective/kl": kl_per_sample.item(),
            "objective/kl_coef": kl_coef,
            "objective/scores": scores.mean().item(),
            "objective/rewards": rewards.sum(-1).mean().item(),
            "returns/mean": masked_mean(returns, mask).item(),
            "advantages/mean": masked_mean(raw_advantages, mask).item(),
            "values/mean": masked_mean(values, mask).item(),
            "completion/tokens": mask.sum(-1).float().mean().item(),
        }
        return PreparedRollout(batch.sequences.to(logps.device), logps, values, advantages, returns, metrics, batch.temperature)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy loss plus vf_coef x the clipped value loss, on this step's rows of the rollout."""
        rollout = batch.prepared(self, policy, reference)
        out = policy.logps(rollout.sequences, with_hidden=True, temperature=rollout.temperature)
        mask = out.mask
        logps = out.tokens.float()
        values = self.values(out.hidden)
        pg_loss, pg_clipfrac = policy_loss(logps, rollout.logps, rollout.advantages, mask, self.cliprange)
        vf_loss, vf_clipfrac = value_loss(values, rollout.values, rollout.returns, mask, self.cliprange_value)
        loss = pg_loss + self.vf_coef * vf_loss
        with torch.no_grad():
            log_ratio = (logps - rollout.logps) * mask
            metrics = {
                **rollout.metrics,
                "loss/policy": pg_loss.item(),
                "loss/value": vf_loss.item(),
                "policy/clipfrac": pg_clipfrac.item(),
                "value/clipfrac": vf_clipfrac.item(),
                "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask).item(),
                "ppo/epoch": float(batch.epoch),
            }
        return loss, metrics


@hookimpl
def register_objectives(register):
    register("ppo", PPO)
