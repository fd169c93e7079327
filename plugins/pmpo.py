"""PMPO: preference optimization as probabilistic inference (Abdolmaleki et al. 2024, arXiv 2410.04166).

PMPO learns from unpaired sets: completions labelled accepted (good) and
rejected (bad), which need not come from the same prompts. It maximises

    alpha x E_accepted[log pi(y|x)] - (1 - alpha) x E_rejected[log pi(y|x)] - beta x D(pi_ref || pi)

with sequence log-probs over the completion tokens and D a divergence between
the reference's and the policy's next-token distributions, taken at every
completion token and averaged. Pushing rejected answers down alone is
unstable; the divergence to the reference is what keeps it in check.

`pmpo` reads labelled data (the `labeled` or `lmsys` builders); `online-pmpo`
samples K answers per prompt and labels the top and bottom of each pool by
reward (the `top-bottom` selector).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import (
    NO_REFERENCE, REFERENCE_DISTRIBUTIONS, SETS, CandidatePool, Embedder, LabeledBatch, Objective, ObjectiveNeeds, PairSelector, Policy,
    Reference, RewardSource, Selection,
)
from pref.plugins.divergences import DIVERGENCES, check_renyi_order, divergence
from pref.sequences import Logps


def check_options(alpha: float, beta: float, divergence_name: str, renyi_alpha: float) -> None:
    """Raise `PrefError` for a weight, strength or divergence PMPO cannot use."""
    if not 0.0 <= alpha <= 1.0:
        raise PrefError(f"pmpo: alpha (the weight of the accepted term) must lie in [0, 1], got {alpha}")
    if beta < 0:
        raise PrefError(f"pmpo: beta must not be negative, got {beta}")
    if divergence_name not in DIVERGENCES:
        raise PrefError(f"pmpo: unknown divergence {divergence_name!r}: choose one of {', '.join(DIVERGENCES)}")
    if divergence_name == "renyi":
        check_renyi_order(renyi_alpha)


def pmpo_loss(
    policy_logps: torch.Tensor,
    labels: torch.Tensor,
    divergences: torch.Tensor | None = None,
    alpha: float = 0.5,
    beta: float = 0.1,
) -> torch.Tensor:
    """The PMPO loss: minus the objective, so lower is better.

    loss = -alpha x mean(accepted logps) + (1 - alpha) x mean(rejected logps) + beta x mean(divergences)

    A batch with no accepted rows drops the accepted term, one with no rejected
    rows the rejected term; `divergences` None drops the last term.

    Args:
        policy_logps: [B] summed log-probs of each completion under the policy.
        labels: [B] bool, True for accepted rows, False for rejected ones.
        divergences: [B] each row's divergence D(pi_ref || pi), averaged over its completion tokens.
        alpha: weight of the accepted term; 1 - alpha weighs the rejected one.
        beta: strength of the divergence term.

    Returns:
        The scalar loss.
    """
    labels = labels.to(policy_logps.device).bool()
    loss = policy_logps.new_zeros(())
    if labels.any():
        loss = loss - alpha * policy_logps[labels].mean()
    if (~labels).any():
        loss = loss + (1.0 - alpha) * policy_logps[~labels].mean()
    if divergences is not None:
        loss = loss + beta * divergences.mean()
    return loss


def row_divergences(reference: Logps, policy: Logps, name: str = "kl", renyi_alpha: float = 0.5) -> torch.Tensor:
    """D(pi_ref || pi) at each completion token, averaged over each row's completion tokens: [B].

    Both `Logps` must hold logits [B, T, V] over the same rows. Only the
    completion positions are scored, so no [B, T, V] divergence tensor is built
    for the prompt and the padding.
    """
    if reference.logits is None or policy.logits is None:
        raise ValueError("row_divergences needs the logits of both the reference and the policy")
    mask = policy.mask.bool()
    per_token = divergence(name, reference.logits.to(policy.logits.device)[mask], policy.logits[mask], renyi_alpha)  # [N]
    rows = mask.nonzero()[:, 0]
    sums = per_token.new_zeros(mask.shape[0]).index_add(0, rows, per_token)
    return sums / mask.sum(-1).clamp(min=1)


class PMPO(Objective):
    """PMPO: raise accepted and lower rejected log-probs, unpaired, kept near the reference by a divergence.

    Options:
        alpha: weight of the accepted term, 1 - alpha of the rejected one (default 0.5).
        beta: strength of the divergence to the reference (default 0.1; 0 needs no reference).
        divergence: "kl" (default), "js" (Jensen-Shannon) or "renyi", computed per token
            over the vocabulary as D(pi_ref || pi).
        renyi_alpha: the Renyi order, positive and not 1 (default 0.5; divergence "renyi" only).
    """

    # the divergence is over full distributions: a frozen model, not a cache
    needs = ObjectiveNeeds(reference=REFERENCE_DISTRIBUTIONS, data=SETS, dataset_builder="labeled")

    def __init__(self, alpha: float = 0.5, beta: float = 0.1, divergence: str = "kl", renyi_alpha: float = 0.5):
        check_options(alpha, beta, divergence, renyi_alpha)
        self.alpha = alpha
        self.beta = beta
        self.divergence = divergence
        self.renyi_alpha = renyi_alpha
        if beta == 0:
            self.needs = replace(self.needs, reference=NO_REFERENCE)  # the loop then loads no reference model

    def loss(self, policy: Policy, reference: Reference | None, batch: LabeledBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The PMPO loss over a batch of labelled rows, with log-prob, divergence and row-count metrics.

        Groups absent from the batch report 0 for their mean log-prob (and 0 rows).
        """
        with_divergence = self.beta > 0
        if with_divergence and (reference is None or not reference.has_logits):
            raise PrefError(
                "pmpo keeps the policy near the reference's full next-token distributions, which this run's "
                "reference does not give: use --reference model (or auto), or -o beta=0 to train without it"
            )
        logps = policy.logps(batch.sequences, with_logits=with_divergence)
        labels = batch.labels.to(logps.sequence.device).bool()
        divergences = None
        if with_divergence:
            assert reference is not None
            with torch.no_grad():
                reference_logps = reference.logps(batch.sequences, with_logits=True)
            divergences = row_divergences(reference_logps, logps, self.divergence, self.renyi_alpha)
        loss = pmpo_loss(logps.sequence, labels, divergences, self.alpha, self.beta)

        sequence = logps.sequence.detach()
        accepted, rejected = sequence[labels], sequence[~labels]
        metrics = {
            "logps/accepted": accepted.mean().item() if len(accepted) else 0.0,
            "logps/rejected": rejected.mean().item() if len(rejected) else 0.0,
            "divergence": divergences.detach().mean().item() if divergences is not None else 0.0,
            "rows/accepted": float(len(accepted)),
            "rows/rejected": float(len(rejected)),
        }
        return loss, metrics


class TopBottomSelector(PairSelector):
    """Sets, not pairs: each prompt's top samples by reward are accepted, its bottom ones rejected.

    Options:
        accept_fraction: share of the K samples accepted, the best ones (default 0.25).
        reject_fraction: share of the K samples rejected, the worst ones (default 0.25).
        score: which of the reward's scores ranks the samples (default "reward").
    A share of K is rounded to a whole number of samples (halves up), at least one
    when the share is above 0. An accepted sample is always strictly better than every rejected
    one: a sample tied with the pool's worst is not accepted, one tied with the
    worst accepted sample is not rejected (counted in `samples/dropped_ties`). A pool
    whose scores are all equal gives nothing (counted in `pools/all_equal`).
    """

    def __init__(self, accept_fraction: float = 0.25, reject_fraction: float = 0.25, score: str = "reward"):
        for name, value in (("accept_fraction", accept_fraction), ("reject_fraction", reject_fraction)):
            if not 0.0 <= value <= 1.0:
                raise PrefError(f"top-bottom: {name} must lie in [0, 1], got {value}")
        if accept_fraction == 0 and reject_fraction == 0:
            raise PrefError("top-bottom: accept_fraction and reject_fraction are both 0, so nothing would be selected")
        self.accept_fraction = accept_fraction
        self.reject_fraction = reject_fraction
        self.score = score

    @staticmethod
    def _count(fraction: float, k: int) -> int:
        return 0 if fraction == 0 else max(1, int(fraction * k + 0.5))  # halves round up

    def select(self, pool: CandidatePool) -> Selection:
        """(prompt, k) accepted and rejected sets from a pool of [P, K] scores."""
        if self.score not in pool.scores:
            raise PrefError(f"the reward gives no score named {self.score!r}; it gives {', '.join(pool.scores)}")
        selection = Selection(metrics={"pools/all_equal": 0.0, "samples/dropped_ties": 0.0})
        for p, scores in enumerate(pool.scores[self.score]):
            if scores.max() == scores.min():
                selection.metrics["pools/all_equal"] += 1
                continue
            k = len(scores)
            n_accept, n_reject = self._count(self.accept_fraction, k), self._count(self.reject_fraction, k)
            # a stable sort: among equal scores the earlier sample ranks first
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            worst = scores.min()
            accepted = [i for i in order[:n_accept] if scores[i] > worst]
            ceiling = min(scores[i] for i in accepted) if accepted else scores.max()
            rejected = [i for i in order[::-1][:n_reject] if scores[i] < ceiling]
            selection.metrics["samples/dropped_ties"] += (n_accept - len(accepted)) + (n_reject - len(rejected))
            selection.accepted.extend((p, i) for i in accepted)
            selection.rejected.extend((p, i) for i in rejected)
        return selection


class OnlinePMPO(PMPO):
    """Online PMPO: K samples per prompt; the top by reward are accepted and the bottom rejected (top-bottom selector).

    Options: those of `pmpo`, and accept_fraction and reject_fraction of the `top-bottom` selector.
    """

    needs = replace(PMPO.needs, online=True, samples_per_prompt=8, dataset_builder="prompts")

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.1,
        divergence: str = "kl",
        renyi_alpha: float = 0.5,
        accept_fraction: float = 0.25,
        reject_fraction: float = 0.25,
    ):
        super().__init__(alpha=alpha, beta=beta, divergence=divergence, renyi_alpha=renyi_alpha)
        TopBottomSelector(accept_fraction, reject_fraction)  # a bad option fails before the model loads
        self.selector_options = {"accept_fraction": accept_fraction, "reject_fraction": reject_fraction}

    def default_selector(self, embedder: Embedder | None = None, reward: RewardSource | None = None) -> PairSelector:
        return TopBottomSelector(**self.selector_options)


@hookimpl
def register_objectives(register):
    register("pmpo", PMPO)
    register("online-pmpo", OnlinePMPO)


@hookimpl
def register_pair_selectors(register):
    register("top-bottom", TopBottomSelector)
