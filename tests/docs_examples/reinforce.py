"""The `reinforce` objective: learns from scored online samples, REINFORCE with each prompt's mean reward as baseline."""

from __future__ import annotations

import dataclasses

import torch

from pref import Minibatch, Objective, ObjectiveNeeds, Policy, Reference, ScoredBatch, hookimpl


class Reinforce(Objective):
    """REINFORCE: raise the log-prob of samples that beat their prompt's mean reward, lower the others.

    Each online step samples K answers per prompt and scores them all (no pair
    selector); the advantage of a sample is its reward minus the mean reward of
    its prompt's K samples, and the loss is -mean(advantage x log-prob).
    """

    # every sample and its scores (`Minibatch`es of a `ScoredBatch` rollout); K = 4 unless -k says otherwise
    needs = ObjectiveNeeds(reference="none", data="samples", online=True, samples_per_prompt=4, grouped=True, dataset_builder="text")

    def prepare(self, policy: Policy, reference: Reference | None, batch: ScoredBatch) -> ScoredBatch:
        """Once per rollout, without grad: the advantages [B], kept with the rollout as a score."""
        rewards = batch.scores["reward"].float().reshape(-1, batch.samples_per_prompt)  # [P, K]
        advantages = (rewards - rewards.mean(dim=1, keepdim=True)).flatten()  # [B]
        return dataclasses.replace(batch, scores={**batch.scores, "advantage": advantages})

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """-mean(advantage x sequence log-prob) over this step's rows of the rollout."""
        rows = batch.prepared(self, policy, reference)  # this step's rows of the prepared rollout
        logps = policy.logps(rows.sequences, temperature=rows.temperature).sequence  # [b], of the distribution the samples came from
        advantages = rows.scores["advantage"].to(logps.device)
        return -(advantages * logps).mean(), {"advantage/abs_mean": advantages.abs().mean().item()}


@hookimpl
def register_objectives(register):
    register("reinforce", Reinforce)
