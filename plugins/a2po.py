"""A*-PO: regress the policy's implicit reward onto an optimal advantage estimated once, before training (Brantley et al. 2025).

https://arxiv.org/abs/2505.20686, as TRL 1.16's `trl.experimental.a2po.A2POTrainer` computes it. Two stages:

1. Before the first step, `num_value_samples` samples of each training prompt from the starting policy (the
   reference), scored by the reward, give the prompt's optimal value V*(x) = beta1 * log(mean_i exp(r_i / beta1)).
   Prompts whose samples all score 0 are left out (`filter_all_incorrect`): nothing to learn from them.
2. Each step samples one completion per prompt from the current policy; the loss regresses the implicit
   reward beta2 * (log pi(y|x) - log pi_ref(y|x)) onto the optimal advantage r(x, y) - V*(x), squared, averaged.

The rewards are meant to be 0 or 1 (a check that passes or fails); several rewards: the `weighted` reward's sum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import REFERENCE_LOGPS, SAMPLES, CandidatePool, Minibatch, Objective, ObjectiveNeeds, Policy, Processes, Reference, ScoredBatch
from pref.sequences import Sequences

log = logging.getLogger(__name__)


def optimal_values(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """V*(x) = beta1 * log(mean over a prompt's samples of exp(r / beta1)), computed stably.

    rewards: [P, N] the rewards of N samples of each of P prompts from the starting policy. Returns [P].
    Between the mean reward (beta1 large) and the best one (beta1 near 0).
    """
    return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(rewards.shape[1]))


def a2po_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor,
              beta2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The squared error between the implicit reward and the optimal advantage, as `A2POTrainer.compute_loss`.

    Args:
        policy_logps: [B] summed completion log-probs under the policy (with grad).
        reference_logps: [B] the same under the reference (the starting policy).
        rewards: [B] each completion's reward; values: [B] V* of its prompt.
        beta2: the KL temperature of the implicit reward.

    Returns:
        loss: [] mean over completions of (beta2 * (policy - reference) - (reward - V*))^2.
        implicit_reward: [B] beta2 * (policy - reference), detached; advantage: [B] reward - V*.
    """
    implicit_reward = beta2 * (policy_logps - reference_logps)
    advantage = rewards - values
    return ((implicit_reward - advantage) ** 2).mean(), implicit_reward.detach(), advantage


def prompt_key(prompt: Prompt) -> str:
    """A short, stable name of a prompt (text or chat messages), for the table of optimal values a checkpoint keeps."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class PreparedRollout:
    """A rollout's rows with their rewards, the V* of their prompts and their reference log-probs, computed once."""

    sequences: Sequences
    rewards: torch.Tensor
    values: torch.Tensor
    reference_logps: torch.Tensor

    def select(self, rows: torch.Tensor) -> "PreparedRollout":
        rows = rows.to(self.rewards.device)
        return PreparedRollout(self.sequences.select(rows), self.rewards[rows], self.values[rows], self.reference_logps[rows])


class A2PO(Objective):
    """A*-PO: one sample per prompt, its implicit reward regressed onto r - V*, V* estimated from the starting policy (TRL's A2POTrainer).

    Options (TRL's `A2POConfig` names):
        num_value_samples: samples of each training prompt from the starting policy, before training, to estimate V* (8).
        beta1: the KL temperature of V*'s estimate (0.5).
        filter_all_incorrect: leave out the prompts whose starting samples all score 0 (true).
        beta2: the KL temperature of the implicit reward in the regression (1e-3).
    `--samples-per-prompt` (1, as TRL) sets the samples of each prompt per step.
    """

    needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=SAMPLES, online=True, samples_per_prompt=1, starting_samples=8, dropout=True,
                           dataset_builder="prompts")

    def __init__(self, num_value_samples: int = 8, beta1: float = 0.5, beta2: float = 1e-3, filter_all_incorrect: bool = True,
                 processes: Processes | None = None):
        if not isinstance(num_value_samples, int) or isinstance(num_value_samples, bool) or num_value_samples < 1:
            raise PrefError(f"a2po: num_value_samples must be a whole number of at least 1, got {num_value_samples!r}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not value > 0:
                raise PrefError(f"a2po: {name} (a KL temperature) must be positive, got {value}")
        self.beta1, self.beta2, self.filter_all_incorrect = beta1, beta2, filter_all_incorrect
        self.processes = processes or Processes()
        self.values: dict[str, float] = {}  # prompt_key -> V*
        self.needs = ObjectiveNeeds(reference=REFERENCE_LOGPS, data=SAMPLES, online=True, samples_per_prompt=self.needs.samples_per_prompt,
                                    starting_samples=num_value_samples, dropout=True, dataset_builder="prompts")  # TRL's A2PO trainer keeps dropout

    def start(self, pool: CandidatePool) -> list[bool]:
        """Stage 1: V* of each prompt from its samples' rewards; the prompts whose samples all scored 0 are left out."""
        rewards = pool.scores["reward"].float()
        values = optimal_values(rewards, self.beta1)
        self.values = {prompt_key(prompt): value for prompt, value in zip(pool.prompts, values.tolist())}
        kept = [not self.filter_all_incorrect or bool((row != 0).any()) for row in rewards]
        if not any(kept):
            raise PrefError(f"a2po: each of the {len(kept)} training prompts' {rewards.shape[1]} samples from the starting policy scored 0, so "
                            "there is nothing to learn from; give prompts it sometimes answers well, or -o filter_all_incorrect=false")
        if self.processes.rank == 0:
            log.info(f"a2po: V* of {len(kept)} prompts from {rewards.shape[1]} samples each (mean {values.mean().item():.4g}); "
                     f"{len(kept) - sum(kept)} whose samples all scored 0 left out")
        return kept

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> PreparedRollout:
        """Each row's reward, its prompt's V* and its reference log-probs, once per rollout."""
        if reference is None:
            raise PrefError("a2po regresses onto log pi - log pi_ref, so it needs a reference model; do not pass --reference none")
        unknown = [p for p in batch.prompts if prompt_key(p) not in self.values]
        if unknown:
            raise PrefError(f"a2po has no V* for the prompt {str(unknown[0])[:60]!r}: V* is estimated before training for the run's "
                            "training prompts only")
        reference_logps = reference.logps(batch.sequences).sequence.float()
        device = reference_logps.device
        values = torch.tensor([self.values[prompt_key(p)] for p in batch.prompts], dtype=torch.float32, device=device)
        return PreparedRollout(batch.sequences.to(device), batch.scores["reward"].to(device).float(), values, reference_logps)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        rollout = batch.prepared(self, policy, reference)
        out = policy.logps(rollout.sequences)
        loss, implicit_reward, advantage = a2po_loss(out.sequence.float(), rollout.reference_logps, rollout.rewards, rollout.values, self.beta2)
        return loss, {"reward": rollout.rewards.mean().item(), "v_star": rollout.values.mean().item(),
                      "implicit_reward": implicit_reward.mean().item(), "advantage": advantage.mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = dict(state["values"])


@hookimpl
def register_objectives(register):
    register("a2po", A2PO)
