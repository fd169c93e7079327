"""The `unlikelihood` objective: learns from labelled sets, raising accepted answers and pushing rejected ones down."""

from __future__ import annotations

import torch

from pref import LabeledBatch, Objective, ObjectiveNeeds, Policy, PrefError, Reference, hookimpl


class Unlikelihood(Objective):
    """Likelihood for accepted answers, unlikelihood for rejected ones; no reference.

    Per row, with m its per-token average log-prob: -m when accepted, and
    -rejected_weight x log(1 - exp(m)) when rejected. The loss is their mean.

    Options:
        rejected_weight: the weight of the rejected rows' term (default 1.0).
    """

    # labelled rows (`LabeledBatch`), read by the `labeled` builder from `--dataset FILE`; no reference model
    needs = ObjectiveNeeds(reference="none", data="sets", dataset_builder="labeled")

    def __init__(self, rejected_weight: float = 1.0):
        if rejected_weight < 0:
            raise PrefError(f"unlikelihood: rejected_weight must not be negative, got {rejected_weight}")
        self.rejected_weight = rejected_weight

    def loss(self, policy: Policy, reference: Reference | None, batch: LabeledBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean of the rows' terms, and the accepted and rejected rows' mean log-probs."""
        mean_logps = policy.logps(batch.sequences).mean  # [B], per-token average over each completion
        accepted = batch.labels.to(mean_logps.device).bool()  # [B]
        rejected_term = -torch.log1p(-mean_logps.exp().clamp(max=1 - 1e-6))  # -log(1 - p), finite as p nears 1
        terms = torch.where(accepted, -mean_logps, self.rejected_weight * rejected_term)
        metrics = {
            "logps/accepted": mean_logps[accepted].mean().item() if accepted.any() else 0.0,
            "logps/rejected": mean_logps[~accepted].mean().item() if (~accepted).any() else 0.0,
        }
        return terms.mean(), metrics


@hookimpl
def register_objectives(register):
    register("unlikelihood", Unlikelihood)
