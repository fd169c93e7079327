"""GRPO: group-relative policy optimisation, K samples per prompt scored against each other (Shao et al. 2024).

https://arxiv.org/abs/2402.03300. Each prompt's K samples are scored by the reward(s);
a sample's advantage is its reward minus the group's mean (divided by a standard
deviation per `scale_rewards`), and the policy takes a clipped policy-gradient step on
it, token by token, as TRL 1.16's `GRPOTrainer` computes it, with each `loss_type` of
its `GRPOConfig`, and GMPO's (TRL's `trl.experimental.gmpo`: the geometric mean of the token
ratios). RLOO (`pref.plugins.rloo`) shares the sampling and the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, REFERENCE_DISTRIBUTIONS, REFERENCE_LOGPS, SAMPLES, Minibatch, Objective, ObjectiveNeeds, Policy, Processes, Reference, ScoredBatch
from pref.plugins.moving_reference import MovesReference, SyncReference
from pref.sequences import Sequences

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo", "gmpo")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # how several rewards make one advantage (TRL's multi_objective_aggregation)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel's correction) of the values that are not NaN (unscored samples), as TRL's `nanstd`;
    NaN for fewer than two."""
    present = ~values.isnan()
    count = present.sum() if dim is None else present.sum(dim=dim)
    squares = ((values - values.nanmean(dim=dim, keepdim=True)) ** 2).nanmean() if dim is None else \
        ((values - values.nanmean(dim=dim, keepdim=True)) ** 2).nanmean(dim=dim)
    return (squares * count / (count - 1)).sqrt()


def group_advantages(
    rewards: torch.Tensor, samples_per_prompt: int, scale_rewards: str = "group", batch_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages: each reward minus its group's mean, scaled as `scale_rewards` says.

    Args:
        rewards: [P * K] (weighted) rewards, the K samples of each prompt consecutive.
        samples_per_prompt: K (at least 2).
        scale_rewards: "group" (divide by the group's std + 1e-4), "batch" (by the whole
            batch's std + 1e-4, Liu et al. 2025's PPO Lite) or "none" (Dr. GRPO).
        batch_rewards: [N] the rewards of the whole batch, every process's (TRL gathers
            them), whose std "batch" divides by; default `rewards`.

    Returns:
        advantages: [P * K].
        std_is_zero: [P * K] bool, True where the scaling std is 0 (no learning signal);
            TRL logs its mean as `frac_reward_zero_std`.

    A NaN reward (a sample the reward left unscored) is left out of the means and stds, and its advantage is 0, as TRL's.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise PrefError(f"unknown scale_rewards {scale_rewards!r}: choose one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, samples_per_prompt)
    mean = grouped.nanmean(dim=1).repeat_interleave(samples_per_prompt)
    if scale_rewards == "batch":
        batch_rewards = rewards if batch_rewards is None else batch_rewards
        scale = std(batch_rewards).expand_as(rewards) if batch_rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        scale = std(grouped, dim=1).repeat_interleave(samples_per_prompt)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (scale + 1e-4)
    return advantages.nan_to_num(nan=0.0), torch.isclose(scale, torch.zeros_like(scale))


def decoupled_advantages(
    parts: torch.Tensor, weights: torch.Tensor, samples_per_prompt: int, batch_rewards: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO's advantages (Liu et al. 2026; TRL's multi_objective_aggregation "normalize_then_sum"): each reward normalised
    within its prompt's group, (r - mean) / (std + 1e-4), then the weighted sum, then normalised over the whole batch.

    Args:
        parts: [P * K, F] each reward's scores, the K samples of each prompt consecutive.
        weights: [F] each reward's weight.
        samples_per_prompt: K (at least 2).
        batch_rewards: turns this process's [P * K] summed rewards into every process's (TRL gathers them); None: this one's.

    Returns:
        advantages: [P * K]; std_is_zero: [P * K] bool, True where the batch's std is 0.

    A NaN score (left unscored by that reward) is out of its reward's group statistics and of the sum; a sample no reward
    scored is out of the batch's, with advantage 0, as TRL's.
    """
    grouped = parts.view(-1, samples_per_prompt, parts.shape[1])
    normalized = (grouped - grouped.nanmean(dim=1, keepdim=True)) / (std(grouped, dim=1).unsqueeze(1) + 1e-4)
    rewards = (normalized.view(-1, parts.shape[1]) * weights.to(parts)).nansum(dim=1)
    rewards[parts.isnan().all(dim=1)] = torch.nan
    batch = rewards if batch_rewards is None else batch_rewards(rewards)
    scale = std(batch) if batch.numel() > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    advantages = (rewards - batch.nanmean()) / (scale + 1e-4)
    return advantages.nan_to_num(nan=0.0), torch.isclose(scale, torch.zeros_like(scale)).expand_as(rewards)


def vespo_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """VESPO's gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w, without grad: [B, 1].

    Shen et al. 2026 (https://arxiv.org/abs/2602.10693); w = exp(sum of token log-ratios),
    k and lambda chosen by the sign of the advantage.
    advantages: [B, 1]; log_ratio, mask: [B, T].
    """
    with torch.no_grad():
        lower = math.log(1e-8)
        sequence_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        log_w = torch.clamp(sequence_log_ratio, lower, 20.0)
        nonnegative = advantages >= 0
        k = torch.where(nonnegative, k_pos, k_neg)
        lam = torch.where(nonnegative, lambda_pos, lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(
    policy_token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    reference_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    total_tokens: float | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_options: dict[str, float] | None = None,
    token_weights: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
    off_policy_mask_threshold: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO policy loss of one batch of samples, as TRL 1.16's `GRPOTrainer._compute_loss`.

    Args:
        policy_token_logps: [B, T] log-probs of the sampled tokens under the policy (with grad).
        old_token_logps: [B, T] the same under the policy that sampled them (no grad).
        advantages: [B] one advantage per sample (see `group_advantages`).
        mask: [B, T] 1 on completion tokens.
        reference_token_logps: [B, T] under the reference; needed when beta > 0.
        beta: weight of the per-token KL penalty exp(r - p) - (r - p) - 1 (Schulman's k3).
        epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] (DAPO's
            clip-higher; epsilon_high defaults to epsilon). For "cispo", epsilon_high caps the ratio.
        loss_type: how token losses become one number:
            "grpo": mean over each sample's tokens, then over samples (length-biased);
            "dr_grpo": sum over tokens / (B * max_completion_length) (Liu et al. 2025);
            "dapo": sum over tokens / `total_tokens`, the completion tokens of the whole
                rollout across processes (Yu et al. 2025), by default this batch's;
            "bnpo": sum over tokens / this batch's completion tokens;
            "cispo": clipped, detached importance weights times advantage times log-prob (MiniMax-M1), as dapo;
            "sapo": a smooth sigmoid gate in place of clipping (Gao et al. 2025), as grpo;
            "luspo": each sample's loss summed over its tokens, mean over samples (LUSPO; meant
                with importance_sampling_level "sequence", which TRL does not enforce);
            "vespo": gamma-weighted sequence ratio times advantage times log-prob, as dapo;
            "gmpo": each sample's geometric mean of its token ratios, each clipped in log space to
                [-epsilon, epsilon_high] on the side its advantage pushes (Zhao et al. 2025), times the
                advantage; a mean over samples (TRL's GMPOTrainer; token level only).
        importance_sampling_level: "token" (a ratio per token) or "sequence" (GSPO: the mean
            token log-ratio of each sample).
        max_completion_length: the sampling length limit, for "dr_grpo".
        total_tokens: the normaliser of dapo, cispo and vespo (None: mask.sum()).
        delta: INTELLECT-2's upper bound on the unclipped ratio (None: off).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for positive and other advantages.
        vespo_options: k_pos, lambda_pos, k_neg, lambda_neg of `vespo_weights`.
        token_weights: [B, T] multiplies each token's policy term, not its KL term (`high_entropy_mask`'s tokens; None: 1).
        use_bias_correction_kl: the KL term times the importance ratio (its gradient then the unbiased reverse-KL one,
            DeepSeek-V3.2; TRL's default); gmpo, as TRL's GMPOTrainer, never.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence masking: the policy term leaves out each sample
            with a negative advantage whose mean token log-ratio old/new exceeds this (None: off; not gmpo).

    Returns:
        loss: [] the loss of this batch.
        stats: per-token tensors for TRL's metrics: "ratio" ([B, T] or [B, 1]), "low_clipped",
            "high_clipped" (bool, same shape, clip-based loss types only), "cispo_clipped",
            "phi" (vespo), and "kl" ([B, T], with beta > 0).
    """
    check_options(loss_type, importance_sampling_level, epsilon, epsilon_high, beta)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = mask.to(policy_token_logps.dtype)
    log_ratio = policy_token_logps - old_token_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = importance = torch.exp(log_weights)
    stats: dict[str, torch.Tensor] = {"ratio": ratio.detach()}

    if loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * policy_token_logps
        stats["cispo_clipped"] = (ratio > epsilon_high) & (advantages > 0)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures * advantages
    elif loss_type == "vespo":
        phi = vespo_weights(advantages, log_ratio, mask, **(vespo_options or {}))
        per_token_loss = -phi * advantages * policy_token_logps
        stats["phi"] = phi
    elif loss_type == "gmpo":  # PPO's one-sided clip in log space, then exp of the mean: the geometric mean of the ratios
        clamped = torch.clamp(log_ratio, -epsilon, epsilon_high)
        clipped = torch.where(advantages > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
        weight = torch.exp((clipped * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
        per_token_loss = (-weight * advantages).expand_as(log_ratio)  # one value per sample: the mean over its tokens keeps it
        stats["low_clipped"] = (log_ratio < -epsilon) & (advantages < 0)
        stats["high_clipped"] = (log_ratio > epsilon_high) & (advantages > 0)
    else:  # grpo, dr_grpo, dapo, bnpo, luspo: PPO's clipped surrogate
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        if delta is not None:  # two-sided: the unclipped ratio is capped too, and TRL's clip metrics see the capped one
            ratio = torch.clamp(ratio, max=delta)
        per_token_loss = -torch.min(ratio * advantages, clipped * advantages)
        stats["low_clipped"] = (ratio < 1 - epsilon) & (advantages < 0)
        stats["high_clipped"] = (ratio > 1 + epsilon_high) & (advantages > 0)

    if off_policy_mask_threshold is not None:  # a sample pushed down that the policy has drifted away from: left out
        drift = ((old_token_logps - policy_token_logps.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        per_token_loss = per_token_loss * ((advantages >= 0) | (drift <= off_policy_mask_threshold)).to(per_token_loss.dtype)

    if token_weights is not None:  # TRL applies top_entropy_quantile's mask here: the normalisers still count every token
        per_token_loss = per_token_loss * token_weights

    if beta != 0.0:
        if reference_token_logps is None:
            raise PrefError("grpo: beta > 0 needs the reference's per-token log-probs")
        difference = reference_token_logps - policy_token_logps
        per_token_kl = torch.exp(difference) - difference - 1
        if use_bias_correction_kl and loss_type != "gmpo":
            per_token_kl = per_token_kl * importance
        per_token_loss = per_token_loss + beta * per_token_kl
        stats["kl"] = per_token_kl.detach()

    if loss_type in ("grpo", "sapo", "gmpo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise PrefError("grpo: loss_type dr_grpo needs max_completion_length (the sampling length limit)")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    else:  # dapo, cispo, vespo
        normaliser = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=mask.dtype)
        loss = (per_token_loss * mask).sum() / normaliser.clamp(min=1.0)
    return loss, stats


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float, processes: Processes | None = None) -> torch.Tensor:
    """[B, T] bool: the completion tokens whose entropy is at least the (1 - `top_quantile`) quantile of every process's
    completion tokens, the forking tokens the policy term keeps (Wang et al. 2025, "Beyond the 80/20 rule"; TRL's
    `top_entropy_quantile`, `get_high_entropy_mask`)."""
    values = entropy[mask.bool()].float()
    if processes is not None and processes.world > 1:  # float32 values survive the round trip through Python floats
        values = torch.tensor(processes.gather(values.tolist()), dtype=torch.float32, device=entropy.device)
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - top_quantile)
    return (entropy * mask >= threshold) & mask.bool()


class EntropyBonus:
    """TRL's `entropy_coef`: the loss minus coef x the mean entropy of the tokens the policy term trains, and
    Skywork-OR1's adaptive control of coef (`use_adaptive_entropy`; He et al. 2025, https://arxiv.org/abs/2505.22312):
    after each optimizer step coef moves by `delta` towards more bonus while the step's entropy, over every
    process's tokens, is at most `target`, and towards less otherwise, within [`minimum`, `maximum`]; the bonus
    applies only while the last step's entropy was at most `target` (none before the first step's is known)."""

    def __init__(self, coef: float = 0.0, adaptive: bool = False, minimum: float = 0.0, maximum: float = 1.0, delta: float = 0.005,
                 target: float = 0.2, processes: Processes | None = None):
        if minimum > maximum or delta < 0:
            raise PrefError(f"grpo: entropy_coef_min ({minimum}) must not exceed entropy_coef_max ({maximum}), "
                            f"and entropy_coef_delta ({delta}) must not be negative")
        self.coef, self.adaptive, self.minimum, self.maximum, self.delta, self.target = coef, adaptive, minimum, maximum, delta, target
        self.processes = processes or Processes()
        self.last_entropy = math.inf  # the last optimizer step's entropy over every process
        self.window = torch.zeros(2, dtype=torch.float64)  # this step's entropy sum and token count, so far

    @property
    def on(self) -> bool:
        return self.coef != 0.0 or self.adaptive

    def term(self, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """coef x the mean of `entropy` over `mask` (with grad), the amount the loss goes down by."""
        total, count = (entropy * mask).sum(), mask.sum()
        if self.adaptive:
            self.window += torch.stack([total.detach(), count.detach()]).double().cpu()
        applied = self.coef if not self.adaptive or self.last_entropy <= self.target else 0.0
        return applied * total / count.clamp(min=1.0)

    def after_step(self) -> None:
        """Adaptive: the step's entropy over every process moves coef (a collective: every process calls it)."""
        if not self.adaptive:
            return
        total, count = self.processes.mean(self.window).tolist()  # means of both: the same ratio as their sums
        self.last_entropy = total / max(count, 1e-12) if count else math.inf
        step = self.delta if self.last_entropy <= self.target else -self.delta
        self.coef = min(max(self.coef + step, self.minimum), self.maximum)
        self.window = torch.zeros(2, dtype=torch.float64)


def check_options(loss_type: str, importance_sampling_level: str = "token", epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0) -> None:
    """Raise `PrefError` for a loss type, clip range or KL weight GRPO cannot use."""
    if loss_type not in LOSS_TYPES:
        raise PrefError(f"unknown GRPO loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise PrefError(f"unknown importance_sampling_level {importance_sampling_level!r}: choose token or sequence")
    if loss_type == "gmpo" and importance_sampling_level != "token":
        raise PrefError("grpo: loss_type gmpo takes the geometric mean of the token ratios itself: use importance_sampling_level token")
    if not 0.0 <= epsilon < 1.0:
        raise PrefError(f"epsilon must lie in [0, 1), got {epsilon}")
    if epsilon_high is not None and epsilon_high < 0:
        raise PrefError(f"epsilon_high must not be negative, got {epsilon_high}")
    if beta < 0:
        raise PrefError(f"beta (the KL weight) must not be negative, got {beta}")


def loss_metrics(stats: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    """TRL's GRPO metric names from `grpo_loss`'s stats: clip_ratio/..., cispo_clip_ratio, vespo/phi_seq_mean, kl.

    Token-level values are averaged over completion tokens; sequence-level ones ([B, 1]) over samples.
    """
    mask = mask.float()

    def mean(values: torch.Tensor) -> float:
        values = values.float()
        if values.shape[-1] == 1:
            return values.mean().item()
        return ((values * mask).sum() / mask.sum().clamp(min=1.0)).item()

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        values = values.float()
        return values.squeeze(1) if values.shape[-1] == 1 else (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

    metrics: dict[str, float] = {}
    if "low_clipped" in stats:
        low, high = stats["low_clipped"], stats["high_clipped"]
        metrics["clip_ratio/low_mean"] = mean(low)
        metrics["clip_ratio/high_mean"] = mean(high)
        metrics["clip_ratio/region_mean"] = mean(low | high)
        metrics["clip_ratio/low_min"] = per_sample(low).min().item()
        metrics["clip_ratio/high_max"] = per_sample(high).max().item()
    if "cispo_clipped" in stats:
        metrics["cispo_clip_ratio"] = mean(stats["cispo_clipped"])
    if "phi" in stats:
        metrics["vespo/phi_seq_mean"] = mean(stats["phi"])
    if "kl" in stats:
        metrics["kl"] = mean(stats["kl"])
    return metrics


# -- the objective ---------------------------------------------------------------------------


def without_truncated(sequences: Sequences, truncated: torch.Tensor) -> Sequences:
    """`sequences` with the truncated rows' completion tokens out of the mask: no loss, no token count, no KL (TRL's
    mask_truncated_completions). Their rewards still count in their group's baseline."""
    keep = (~truncated.to(sequences.completion_mask.device)).unsqueeze(1).to(sequences.completion_mask.dtype)
    return Sequences(sequences.input_ids, sequences.attention_mask, sequences.completion_mask * keep)


def truncated_of(batch: ScoredBatch, leave_out: bool) -> torch.Tensor | None:
    """The rollout's cut completions ([B] bool, None when unknown); `leave_out` (mask_truncated_completions) needs them known."""
    if leave_out and batch.truncated is None:
        raise PrefError("mask_truncated_completions needs to know which completions the sampling limit cut: "
                        "sample with a policy whose `sample` says so (Samples.truncated), as HFPolicy's does")
    return batch.truncated


def completion_metrics(batch: ScoredBatch) -> dict[str, float]:
    """TRL's completions/* of a rollout: its answers' lengths in tokens (with the one that ends them) and, where `batch.truncated`
    is known, the share the sampling limit cut (clipped_ratio) and the lengths of the others (terminated; 0 when all were cut)."""
    lengths = batch.sequences.completion_mask[:, 1:].sum(-1).float().cpu()
    metrics = {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
               "completions/max_length": lengths.max().item()}
    if batch.truncated is not None:
        cut = batch.truncated.cpu()
        ended = lengths[~cut] if (~cut).any() else torch.zeros(1)
        metrics.update({"completions/clipped_ratio": cut.float().mean().item(), "completions/mean_terminated_length": ended.mean().item(),
                        "completions/min_terminated_length": ended.min().item(), "completions/max_terminated_length": ended.max().item()})
    return metrics


def rollout_metrics(batch: ScoredBatch, rewards: torch.Tensor, std_is_zero: torch.Tensor) -> dict[str, float]:
    """TRL's sample metrics of one rollout: reward, reward_std, frac_reward_zero_std, rewards/NAME/mean, completions/...

    rewards: [B] the (weighted) rewards the advantages were built from.
    A `weighted` reward's parts (scores named NAME/reward) are reported as rewards/NAME/mean. Unscored samples (NaN) are left out.
    """
    metrics = {
        "reward": rewards.nanmean().item(),
        "reward_std": std(rewards).item() if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": std_is_zero.float().mean().item(),
        **completion_metrics(batch),
    }
    for name, values in batch.scores.items():
        if name.endswith("/reward"):
            metrics[f"rewards/{name[: -len('/reward')]}/mean"] = values.float().nanmean().item()
    return metrics


@dataclass
class PreparedSamples:
    """A rollout with what the group-relative losses train on, computed once before its first update.

    sequences: the B rows; advantages: [B]; old_logps: [B, T] the sampling policy's token
    log-probs, or None when every rollout serves one step (the ratio is then 1 and the current
    log-probs, detached, stand in, as TRL does); reference_logps: [B, T] or None (beta 0);
    total_tokens: completion tokens per optimizer step of this rollout, averaged over processes (dapo's normaliser);
    max_completion_length: dr_grpo's length normaliser (None: each mini-batch's longest completion);
    temperature: the sampling temperature, at which the log-probs are taken (`ScoredBatch.temperature`, as TRL's).
    """

    sequences: Sequences
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    reference_logps: torch.Tensor | None
    total_tokens: float
    metrics: dict[str, float]
    max_completion_length: int | None = None
    temperature: float = 1.0

    def select(self, rows: torch.Tensor) -> "PreparedSamples":
        rows = rows.to(self.advantages.device)
        return PreparedSamples(
            self.sequences.select(rows),
            self.advantages[rows],
            None if self.old_logps is None else self.old_logps[rows],
            None if self.reference_logps is None else self.reference_logps[rows],
            self.total_tokens,
            self.metrics,
            self.max_completion_length,
            self.temperature,
        )


def group_size(batch: ScoredBatch, objective_name: str) -> int:
    """K of a rollout, checked: group-relative baselines need at least two samples of each prompt."""
    k = batch.samples_per_prompt
    if k < 2 or len(batch) % k:
        raise PrefError(f"{objective_name} compares the samples of each prompt: use --samples-per-prompt 2 or more (got {k})")
    return k


class GRPO(MovesReference, Objective):
    """GRPO: K samples per prompt, advantages relative to the group, clipped policy-gradient steps (TRL's GRPOTrainer).

    Options (TRL's `GRPOConfig` names):
        loss_type: "dapo" (default), "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo" or "gmpo".
        scale_rewards: "group" (default), "batch" or "none".
        epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] (0.2; epsilon_high defaults to epsilon);
            for gmpo in log space, [exp(-epsilon), exp(epsilon_high)] (0.4, GMPO's).
        beta: weight of the per-token KL to the reference (default 0: no reference model is loaded).
        num_iterations: passes over each rollout (default 1), each cut into `steps_per_generation`
            mini-batches, one optimizer step each (default 1).
        importance_sampling_level: "token" (default) or "sequence" (GSPO).
        max_completion_length: dr_grpo's normaliser (default: the run's sampling limit, --max-new-tokens, as TRL's
            max_completion_length is both; a constant, so micro-batches and processes weigh each token alike).
        delta: INTELLECT-2's cap on the unclipped ratio (none by default).
        mask_truncated_completions: leave the completions the sampling limit cut (no EOS) out of the loss (DAPO's
            overlong filtering; off). Their rewards still count in their group's advantages, as TRL.
        top_entropy_quantile: the policy term keeps only this top fraction of the completion tokens by entropy, the
            "forking" tokens (Wang et al. 2025; 1.0, all: off); 0.2 is the paper's. The entropies come from the lean
            log-probs' own chunks, never the full logits; the run then logs `entropy`.
        entropy_coef: the loss minus this times the mean entropy of the tokens the policy term trains (0: off), with grad
            through the same chunks; logs `policy_loss` (without it) and `entropy_coef` (the one this step applied; TRL
            logs the one after its adaptive update).
        use_adaptive_entropy, entropy_coef_min, entropy_coef_max, entropy_coef_delta, entropy_target: Skywork-OR1's
            control of entropy_coef (`EntropyBonus`; off, 0.0, 1.0, 0.005, 0.2 nats), kept in checkpoints.
        use_bias_correction_kl: with beta > 0, the KL term times the importance ratio, the unbiased reverse-KL gradient of
            DeepSeek-V3.2 (on, TRL's default; before 2026-12-01 pref had no correction). Not gmpo's, as TRL's GMPOTrainer.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence masking: samples with a negative advantage whose
            mean token log-ratio of the sampling policy to the current one exceeds this are left out of the policy term
            (off; e.g. 0.5). It matters with num_iterations or steps_per_generation above 1, where the policy moves
            between sampling and training.
        multi_objective_aggregation: how several rewards (`--reward a --reward b`) make one advantage: "sum_then_normalize"
            (default: the weighted sum, then scale_rewards) or "normalize_then_sum" (GDPO: each reward normalised within its
            group, the weighted sum, then normalised over the batch; scale_rewards does not apply), as TRL.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (1.0, 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weights (2, 3, 3, 2).
    With several processes, scale_rewards "batch" divides by the std of every process's rewards and
    dapo (cispo, vespo) by every process's completion tokens, as TRL does, so the update equals one process's.
        sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps: TR-DPO's moving reference, as for dpo (off; 0.6, 512;
            needs beta > 0).
    Several rewards: `--reward a --reward b --reward-weights 1,0.5` (TRL's reward_weights), the `weighted` reward's sum.
    """

    needs = ObjectiveNeeds(reference=NO_REFERENCE, data=SAMPLES, online=True, samples_per_prompt=8, grouped=True, dropout=True,
                           dataset_builder="prompts", unscored_samples=True)

    def __init__(
        self,
        loss_type: str = "dapo",
        scale_rewards: str = "group",
        epsilon: float | None = None,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        importance_sampling_level: str = "token",
        max_completion_length: int | None = None,
        delta: float | None = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        mask_truncated_completions: bool = False,
        top_entropy_quantile: float = 1.0,
        entropy_coef: float = 0.0,
        use_adaptive_entropy: bool = False,
        entropy_coef_min: float = 0.0,
        entropy_coef_max: float = 1.0,
        entropy_coef_delta: float = 0.005,
        entropy_target: float = 0.2,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        use_bias_correction_kl: bool = True,
        off_policy_mask_threshold: float | None = None,
        multi_objective_aggregation: str = "sum_then_normalize",
        processes: Processes | None = None,
    ):
        if epsilon is None:
            epsilon = 0.4 if loss_type == "gmpo" else 0.2  # TRL's GMPOConfig and GRPOConfig defaults
        check_options(loss_type, importance_sampling_level, epsilon, epsilon_high, beta)
        if scale_rewards not in SCALE_REWARDS:
            raise PrefError(f"unknown scale_rewards {scale_rewards!r}: choose one of {', '.join(SCALE_REWARDS)}")
        if multi_objective_aggregation not in AGGREGATIONS:
            raise PrefError(f"unknown multi_objective_aggregation {multi_objective_aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
        self.multi_objective_aggregation = multi_objective_aggregation
        for name, value in (("num_iterations", num_iterations), ("steps_per_generation", steps_per_generation)):
            if not isinstance(value, int) or value < 1:
                raise PrefError(f"grpo: {name} must be a whole number of at least 1, got {value!r}")
        if max_completion_length is not None and max_completion_length < 1:
            raise PrefError(f"grpo: max_completion_length must be at least 1, got {max_completion_length}")
        if sapo_temperature_pos <= 0 or sapo_temperature_neg <= 0:
            raise PrefError("grpo: the SAPO temperatures must be positive")
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.epsilon, self.epsilon_high, self.beta = epsilon, epsilon_high, beta
        self.importance_sampling_level, self.max_completion_length, self.delta = importance_sampling_level, max_completion_length, delta
        self.sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
        self.vespo_options = {"k_pos": vespo_k_pos, "lambda_pos": vespo_lambda_pos, "k_neg": vespo_k_neg, "lambda_neg": vespo_lambda_neg}
        self.processes = processes or Processes()
        self.mask_truncated_completions = mask_truncated_completions
        if off_policy_mask_threshold is not None and (not off_policy_mask_threshold >= 0 or loss_type == "gmpo"):
            raise PrefError(f"grpo: off_policy_mask_threshold must be a number of 0 or more, and not with gmpo (TRL's GMPOTrainer has no "
                            f"off-policy mask), got {off_policy_mask_threshold!r} with loss_type {loss_type}")
        self.use_bias_correction_kl, self.off_policy_mask_threshold = use_bias_correction_kl, off_policy_mask_threshold
        if not 0.0 < top_entropy_quantile <= 1.0:
            raise PrefError(f"grpo: top_entropy_quantile must lie in (0, 1], got {top_entropy_quantile}")
        self.top_entropy_quantile = top_entropy_quantile
        self.entropy_bonus = EntropyBonus(entropy_coef, use_adaptive_entropy, entropy_coef_min, entropy_coef_max, entropy_coef_delta,
                                          entropy_target, self.processes)
        if sync_ref_model and beta == 0:
            raise PrefError("grpo: sync_ref_model moves the reference of the KL term, which beta 0 leaves out: set beta > 0, or drop it")
        self.moving = SyncReference(ref_model_mixup_alpha, ref_model_sync_steps) if sync_ref_model else None
        self.needs = ObjectiveNeeds(
            reference=REFERENCE_DISTRIBUTIONS if sync_ref_model else REFERENCE_LOGPS if beta > 0 else NO_REFERENCE,
            moves_reference=sync_ref_model,
            dropout=True,  # as TRL's GRPO and RLOO trainers (disable_dropout False)
            data=SAMPLES,
            online=True,
            unscored_samples=True,  # a sample the reward left unscored gets advantage 0, as TRL's
            dataset_builder="prompts",
            samples_per_prompt=self.needs.samples_per_prompt,
            grouped=True,
            epochs_per_rollout=num_iterations,
            minibatches_per_rollout=steps_per_generation,
        )

    def advantages(self, batch: ScoredBatch, samples_per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] advantages and [B] "std is zero" flags from this process's share of the rollout's rewards."""
        rewards = batch.scores["reward"].float()

        def every_process(values: torch.Tensor) -> torch.Tensor:  # float32 values survive the round trip through Python floats
            return torch.tensor(self.processes.gather(values.tolist()), dtype=values.dtype, device=values.device)

        gathered = every_process if self.processes.world > 1 else None
        if self.multi_objective_aggregation == "normalize_then_sum":  # one reward: its own scores, weight 1
            names = list(batch.reward_weights) or ["reward"]
            parts = torch.stack([batch.scores[f"{n}/reward" if batch.reward_weights else n].float() for n in names], dim=1)
            weights = torch.tensor([batch.reward_weights.get(n, 1.0) for n in names])
            return decoupled_advantages(parts, weights, samples_per_prompt, gathered)
        batch_rewards = gathered(rewards) if gathered and self.scale_rewards == "batch" else None
        return group_advantages(rewards, samples_per_prompt, self.scale_rewards, batch_rewards)

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> PreparedSamples:
        """Advantages, the sampling policy's and the reference's token log-probs, once per rollout."""
        k = group_size(batch, type(self).__name__.lower())
        sequences, truncated = batch.sequences, truncated_of(batch, self.mask_truncated_completions)
        if truncated is not None and self.mask_truncated_completions:
            sequences = without_truncated(sequences, truncated)
        steps = self.needs.epochs_per_rollout * self.needs.minibatches_per_rollout
        old_logps = None
        mask = sequences.completion_mask.clone()
        mask[:, 0] = 0
        if steps > 1:
            out = policy.logps(sequences, temperature=batch.temperature)
            old_logps, mask = out.tokens.float(), out.mask
        device = mask.device
        reference_logps = None
        if self.beta > 0:
            if reference is None:
                raise PrefError("grpo with beta > 0 needs a reference model for its KL term; do not pass --reference none")
            reference_logps = reference.logps(sequences, temperature=batch.temperature).tokens.to(device).float()
        rewards = batch.scores["reward"].to(device).float()
        advantages, std_is_zero = self.advantages(batch, k)
        advantages, std_is_zero = advantages.to(device), std_is_zero.to(device)
        # dapo's normaliser: the mean over processes of their completion tokens, so that the average of the
        # processes' losses (DDP averages their gradients) is the sum over every token / every process's tokens
        tokens = mask.sum().double()
        if self.processes.world > 1:
            tokens = self.processes.mean(tokens.reshape(1)).reshape(()).to(tokens.device)
        total_tokens = tokens.item() / self.needs.minibatches_per_rollout
        metrics = rollout_metrics(batch, rewards, std_is_zero)
        max_completion_length = self.max_completion_length or batch.max_new_tokens
        return PreparedSamples(sequences.to(device), advantages, old_logps, reference_logps, total_tokens, metrics, max_completion_length,
                               batch.temperature)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The GRPO loss on this step's rows of the rollout, with TRL's metrics."""
        rollout = batch.prepared(self, policy, reference)
        forking = self.top_entropy_quantile < 1.0
        with_entropy = forking or self.entropy_bonus.on
        out = policy.logps(rollout.sequences, with_entropy=with_entropy, temperature=rollout.temperature)
        logps, mask = out.tokens.float(), out.mask
        old_logps = logps.detach() if rollout.old_logps is None else rollout.old_logps
        token_weights, entropy_metrics = None, {}
        if with_entropy:
            assert out.entropy is not None
            entropy_metrics = {"entropy": ((out.entropy * mask).sum() / mask.sum().clamp(min=1)).item()}
        if forking:
            token_weights = high_entropy_mask(out.entropy.detach(), mask, self.top_entropy_quantile, self.processes).to(logps.dtype)
        # a rollout that does not know its sampling limit (built by hand) falls back on this mini-batch's longest completion
        max_length = rollout.max_completion_length or int(mask.sum(-1).max().clamp(min=1))
        loss, stats = grpo_loss(
            logps, old_logps, rollout.advantages, mask,
            reference_token_logps=rollout.reference_logps,
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=max_length,
            total_tokens=rollout.total_tokens,
            delta=self.delta,
            sapo_temperature_pos=self.sapo_temperatures[0],
            sapo_temperature_neg=self.sapo_temperatures[1],
            vespo_options=self.vespo_options,
            token_weights=token_weights,
            use_bias_correction_kl=self.use_bias_correction_kl,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
        )
        if self.entropy_bonus.on:  # over the tokens the policy term trains, as TRL
            entropy_metrics.update({"policy_loss": loss.item(), "entropy_coef": self.entropy_bonus.coef})
            loss = loss - self.entropy_bonus.term(out.entropy.float(), mask if token_weights is None else mask * token_weights)
        return loss, {**rollout.metrics, **loss_metrics(stats, mask), **entropy_metrics, "num_iteration": float(batch.epoch)}

    def after_step(self, step: int, policy: Policy, reference: Reference | None) -> None:
        super().after_step(step, policy, reference)  # a moving reference's step (sync_ref_model)
        self.entropy_bonus.after_step()

    def state_dict(self) -> dict[str, float]:
        """The adaptive entropy coefficient and the last step's entropy: a resume goes on with them."""
        bonus = self.entropy_bonus
        return {"entropy_coef": bonus.coef, "last_entropy": bonus.last_entropy} if bonus.adaptive else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.entropy_bonus.adaptive and state:
            self.entropy_bonus.coef, self.entropy_bonus.last_entropy = state["entropy_coef"], state["last_entropy"]


@hookimpl
def register_objectives(register):
    register("grpo", GRPO)
