"""RLOO: REINFORCE with a leave-one-out baseline over K samples per prompt (Ahmadian et al. 2024).

https://arxiv.org/abs/2402.14740. Each sample's advantage is its reward minus the mean
reward of the prompt's other K - 1 samples; the reward includes a KL penalty
beta * sum over tokens of (log pi_old - log pi_ref), and the policy takes PPO's clipped
step on whole-sequence ratios, as TRL 1.16's `RLOOTrainer` computes it.
"""

from __future__ import annotations

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, REFERENCE_DISTRIBUTIONS, REFERENCE_LOGPS, SAMPLES, Minibatch, Objective, ObjectiveNeeds, Policy, Processes, Reference, ScoredBatch
from pref.plugins.grpo import PreparedSamples, group_size, rollout_metrics, std, truncated_of, without_truncated
from pref.plugins.moving_reference import MovesReference, SyncReference


def leave_one_out_advantages(
    rewards: torch.Tensor, samples_per_prompt: int, normalize: bool = False, processes: Processes | None = None,
) -> torch.Tensor:
    """Each reward minus the mean of the other samples of its prompt: [P * K].

    Args:
        rewards: [P * K] rewards (KL penalty included), the K samples of each prompt consecutive.
        samples_per_prompt: K, at least 2.
        normalize: then standardise over the batch: (a - mean) / (std + 1e-4) (TRL's `normalize_advantages`),
            the mean and std of every process's advantages (TRL gathers them).
        processes: the run's processes (default: this one alone).

    A NaN reward (a sample the reward left unscored) is out of its siblings' baselines and of the normalisation, and its
    advantage is 0, as is that of a prompt's only scored sample (TRL's).
    """
    if samples_per_prompt < 2:
        raise PrefError(f"rloo needs at least 2 samples per prompt for a leave-one-out baseline, got {samples_per_prompt}")
    grouped = rewards.view(-1, samples_per_prompt)
    scored = (~grouped.isnan()).sum(dim=1, keepdim=True)
    baselines = (grouped.nansum(dim=1, keepdim=True) - grouped) / (scored - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        batch = advantages
        if processes is not None and processes.world > 1:
            batch = torch.tensor(processes.gather(advantages.tolist()), dtype=advantages.dtype, device=advantages.device)
        advantages = (advantages - batch.nanmean()) / (std(batch) + 1e-4)
    return advantages.nan_to_num(nan=0.0)


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


# -- the objective ---------------------------------------------------------------------------


class RLOO(MovesReference, Objective):
    """RLOO: K samples per prompt, leave-one-out baseline, clipped steps on whole-sequence ratios (TRL's RLOOTrainer).

    Options (TRL's `RLOOConfig` names):
        beta: weight of the KL penalty in the reward (default 0.05, as TRL; 0 loads no reference model).
        epsilon, epsilon_high: the clip range of the sequence ratio (0.2; epsilon_high defaults to epsilon).
        normalize_advantages: standardise the advantages over the rollout, every process's (default false).
        num_iterations: passes over each rollout (default 1), each cut into `steps_per_generation`
            mini-batches, one optimizer step each (default 1).
        mask_truncated_completions: leave the completions the sampling limit cut (no EOS) out of the loss and the KL
            penalty (off), as TRL.
        reward_clip_range: [lowest, highest]: each reward clipped into it before the KL penalty and the baselines (TRL's;
            off). The logged rewards are the scores as given, as TRL's.
        sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps: TR-DPO's moving reference, as for dpo (off; 0.6, 512;
            needs beta > 0).
    Several rewards: `--reward a --reward b --reward-weights 1,0.5` (TRL's reward_weights), the `weighted` reward's sum.
    """

    needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=SAMPLES, online=True, samples_per_prompt=8, grouped=True, dropout=True, dataset_builder="prompts",
                           unscored_samples=True)

    def __init__(
        self,
        beta: float = 0.05,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        normalize_advantages: bool = False,
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        mask_truncated_completions: bool = False,
        reward_clip_range: list[float] | None = None,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        processes: Processes | None = None,
    ):
        if beta < 0:
            raise PrefError(f"rloo: beta (the KL weight) must not be negative, got {beta}")
        if reward_clip_range is not None and not (isinstance(reward_clip_range, (list, tuple)) and len(reward_clip_range) == 2
                                                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in reward_clip_range)
                                                  and reward_clip_range[0] <= reward_clip_range[1]):
            raise PrefError(f"rloo: reward_clip_range must be [lowest, highest], two numbers in order (e.g. -o reward_clip_range=[-1,1]), "
                            f"got {reward_clip_range!r}")
        self.reward_clip_range = reward_clip_range
        if not 0.0 <= epsilon < 1.0:
            raise PrefError(f"rloo: epsilon must lie in [0, 1), got {epsilon}")
        if epsilon_high is not None and epsilon_high < 0:
            raise PrefError(f"rloo: epsilon_high must not be negative, got {epsilon_high}")
        for name, value in (("num_iterations", num_iterations), ("steps_per_generation", steps_per_generation)):
            if not isinstance(value, int) or value < 1:
                raise PrefError(f"rloo: {name} must be a whole number of at least 1, got {value!r}")
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.normalize_advantages = normalize_advantages
        self.processes = processes or Processes()
        self.mask_truncated_completions = mask_truncated_completions
        if sync_ref_model and beta == 0:
            raise PrefError("rloo: sync_ref_model moves the reference of the KL term, which beta 0 leaves out: set beta > 0, or drop it")
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

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> PreparedSamples:
        """The sampling policy's log-probs, KL-penalised rewards and leave-one-out advantages, once per rollout."""
        k = group_size(batch, "rloo")
        sequences, truncated = batch.sequences, truncated_of(batch, self.mask_truncated_completions)
        if truncated is not None and self.mask_truncated_completions:  # out of the loss and of the KL penalty, as TRL
            sequences = without_truncated(sequences, truncated)
        out = policy.logps(sequences, temperature=batch.temperature)  # the KL penalty needs the sampling policy's token log-probs
        old_logps, mask = out.tokens.float(), out.mask
        device = mask.device
        scores = batch.scores["reward"].to(device).float()
        rewards, metrics = scores, {}
        if self.reward_clip_range is not None:  # before the KL penalty; the logged rewards are the scores, as TRL's
            rewards = scores.clamp(min=self.reward_clip_range[0], max=self.reward_clip_range[1])
        if self.beta > 0:
            if reference is None:
                raise PrefError("rloo with beta > 0 needs a reference model for its KL penalty; do not pass --reference none")
            reference_logps = reference.logps(sequences, temperature=batch.temperature).tokens.to(device).float()
            rewards, per_token_kl = kl_penalised_rewards(rewards, old_logps, reference_logps, mask, self.beta)
            metrics["kl"] = (per_token_kl.sum() / mask.sum().clamp(min=1)).item()
        advantages = leave_one_out_advantages(rewards, k, self.normalize_advantages, self.processes)
        std_is_zero = torch.isclose(std(rewards.view(-1, k), dim=1), torch.zeros(()))
        metrics.update(rollout_metrics(batch, scores, std_is_zero))  # TRL reports the rewards before the KL penalty
        return PreparedSamples(sequences.to(device), advantages, old_logps, None, 0.0, metrics, temperature=batch.temperature)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped sequence-level loss on this step's rows of the rollout, with TRL's metrics."""
        rollout = batch.prepared(self, policy, reference)
        out = policy.logps(rollout.sequences, temperature=rollout.temperature)
        assert rollout.old_logps is not None
        old = (rollout.old_logps * out.mask).sum(-1)
        loss, stats = rloo_loss(out.sequence.float(), old, rollout.advantages, self.epsilon, self.epsilon_high)
        low, high = stats["low_clipped"].float(), stats["high_clipped"].float()
        metrics = {
            **rollout.metrics,
            "clip_ratio/low_mean": low.mean().item(),
            "clip_ratio/low_min": low.min().item(),
            "clip_ratio/high_mean": high.mean().item(),
            "clip_ratio/high_max": high.max().item(),
            "clip_ratio/region_mean": (low + high).clamp(max=1).mean().item(),
            "num_iteration": float(batch.epoch),
        }
        return loss, metrics


@hookimpl
def register_objectives(register):
    register("rloo", RLOO)
