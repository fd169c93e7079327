"""DivPO (Lanchantin et al. 2025, arXiv 2501.18101) and online DPO.

Both sample K answers per prompt from the current policy and train the DPO
loss on one pair per prompt. Online DPO pairs the best answer with the
worst. DivPO pairs the most *diverse* answer among the good ones with the
least diverse among the bad ones, so the policy learns quality without
collapsing onto a few answers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import CandidatePool, Embedder, PairSelector, RewardSource, Selection
from pref.plugins.dpo import DPO

CRITERIA = ("probability", "frequency", "semantic")
MAX_RHO = 0.5


def check_options(rho: float, criterion: str) -> None:
    """Raise `PrefError` for a band width or diversity criterion the selector cannot use."""
    if criterion not in CRITERIA:
        raise PrefError(f"unknown diversity criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    if not 0.0 <= rho <= MAX_RHO:
        # wider bands overlap, and a good sample could then be paired above a better bad one
        raise PrefError(f"rho must lie in [0, {MAX_RHO}], got {rho}")


def quality_bands(quality: torch.Tensor, rho: float, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples may be chosen (good) and which rejected (bad), as [K] bool masks.

    With an absolute `threshold`: good is quality >= threshold, bad is below.
    Otherwise the paper's rule: good is within rho x (max - min) of the best
    quality, bad within rho x (max - min) of the worst; rho=0 keeps only the
    best and the worst. A sample in both bands (rho=0.5, right in the middle)
    counts as good, so every good sample is better than every bad one. When
    all qualities are equal every sample is good.
    """
    if threshold is not None:
        return quality >= threshold, quality < threshold
    best, worst = quality.max(), quality.min()
    band = rho * (best - worst)
    good = quality >= best - band
    return good, (quality <= worst + band) & ~good


def diversity_scores(pool: CandidatePool, prompt: int, criterion: str, embedder: Embedder | None) -> torch.Tensor:
    """[K] diversity of each sample of one prompt; higher is more diverse.

    probability: -log pi(y|x), rarer answers under the policy are more diverse (the paper's default).
    frequency:   1 / how often the same answer appears in the pool.
    semantic:    mean distance (1 - similarity) to the other answers, from the embedder.
    """
    answers = [a.strip().lower() for a in pool.completions[prompt]]
    if criterion == "probability":
        if pool.logps is None:
            raise ValueError("the probability criterion needs the policy's log-probs in the pool")
        return -pool.logps[prompt].float()
    if criterion == "frequency":
        counts = Counter(answers)
        return torch.tensor([1.0 / counts[a] for a in answers])
    assert embedder is not None
    similarity = embedder.similarity(answers).float()
    k = len(answers)
    return (1.0 - similarity).sum(-1) / max(1, k - 1)


class DiversePairSelector(PairSelector):
    """DivPO's rule: the most diverse good sample is chosen, the least diverse bad one rejected.

    Options:
        rho: width of the good and bad quality bands, as a share of the pool's quality range (0 to 0.5).
        threshold: an absolute quality threshold instead of rho's bands (rho is then
            unused); by default the reward's own `quality_threshold`, if it has one.
        criterion: "probability" (default), "frequency" or "semantic" (needs an embedder).
        score: which reward score is the quality (default "reward").
    With a threshold, when every sample is good (nothing to reject) the most and
    least diverse good samples are paired; when none is good the prompt gives no
    pair. Without one, a pool whose qualities are all equal gives no pair. A pool
    whose answers are all the same gives no pair. Each case is counted in the metrics.
    """

    def __init__(
        self,
        rho: float = 0.0,
        threshold: float | None = None,
        criterion: str = "probability",
        score: str = "reward",
        embedder: Embedder | None = None,
        reward: RewardSource | None = None,
    ):
        check_options(rho, criterion)
        if threshold is None and reward is not None:
            threshold = reward.quality_threshold
        if criterion == "semantic" and embedder is None:
            from pref.plugins.embedders import WordNetEmbedder

            embedder = WordNetEmbedder()
        self.rho, self.threshold, self.criterion, self.score, self.embedder = rho, threshold, criterion, score, embedder
        self.needs_logps = criterion == "probability"

    def select(self, pool: CandidatePool) -> Selection:
        if self.score not in pool.scores:
            raise PrefError(f"the reward gives no score named {self.score!r}; it gives {', '.join(pool.scores)}")
        selection = Selection(metrics={"pools/all_good": 0.0, "pools/none_good": 0.0, "pools/all_equal": 0.0, "pools/equal_quality": 0.0})
        for p, quality in enumerate(pool.scores[self.score]):
            answers = [a.strip().lower() for a in pool.completions[p]]
            if len(set(answers)) == 1:
                selection.metrics["pools/all_equal"] += 1
                continue
            if self.threshold is None and quality.max() == quality.min():
                # no pass mark and no spread: nothing says whether these are good or bad
                selection.metrics["pools/equal_quality"] += 1
                continue
            good, bad = quality_bands(quality, self.rho, self.threshold)
            if not good.any():
                selection.metrics["pools/none_good"] += 1
                continue
            diversity = diversity_scores(pool, p, self.criterion, self.embedder)
            chosen = int(torch.where(good, diversity, -torch.inf).argmax())
            rejected = int(torch.where(bad if bad.any() else good, diversity, torch.inf).argmin())
            if answers[chosen] == answers[rejected]:
                # the same answer on both sides (all good and equally diverse): nothing to prefer
                selection.metrics["pools/all_equal"] += 1
                continue
            if not bad.any():
                selection.metrics["pools/all_good"] += 1
            selection.pairs.append((p, chosen, rejected))
        return selection


class BestWorstSelector(PairSelector):
    """Online DPO's rule: the highest-reward sample is chosen, the lowest rejected (ties broken at random)."""

    def __init__(self, score: str = "reward"):
        self.score = score

    def select(self, pool: CandidatePool) -> Selection:
        if self.score not in pool.scores:
            raise PrefError(f"the reward gives no score named {self.score!r}; it gives {', '.join(pool.scores)}")
        selection = Selection(metrics={"pools/all_equal": 0.0})
        for p, reward in enumerate(pool.scores[self.score]):
            if reward.max() == reward.min():
                selection.metrics["pools/all_equal"] += 1
                continue
            best = torch.nonzero(reward == reward.max()).flatten()
            worst = torch.nonzero(reward == reward.min()).flatten()
            chosen = int(best[torch.randint(len(best), ())])
            rejected = int(worst[torch.randint(len(worst), ())])
            selection.pairs.append((p, chosen, rejected))
        return selection


class OnlineDPO(DPO):
    """Online DPO: K samples per prompt from the current policy, best vs worst by reward, DPO loss."""

    needs = replace(DPO.needs, online=True, samples_per_prompt=8, dataset_builder="prompts")

    def default_selector(self, embedder: Embedder | None = None, reward: RewardSource | None = None) -> PairSelector:
        return BestWorstSelector()


#: DivPO's default weight of the negative log-likelihood of its chosen answers (DPO's
#: `sft_weight`). The DPO loss moves only the chosen and the rejected answer's own
#: likelihood; the NLL term raises the chosen answer against all others, so DivPO's
#: diverse chosen answers pull the policy towards good and varied answers at once. On the
#: noun task (bench/divpo_nouns.py) DivPO without it kept 37 distinct valid nouns in 200
#: answers, with it 65, at a valid rate of 0.94 instead of 0.98.
DIVPO_SFT_WEIGHT = 1.0


class DivPO(OnlineDPO):
    """Diverse preference optimization: most diverse good vs least diverse bad sample, DPO loss.

    Online DPO with another pair selector. Options: the selector's (`rho`, `threshold`,
    `criterion`) and the DPO options, with `sft_weight` DIVPO_SFT_WEIGHT by default. The
    criterion defaults to "frequency", not the paper's "probability": on the noun task,
    preferring the answer the policy finds least likely was most easily met by flattening
    the policy towards every word of its vocabulary (nearly every answer distinct), and
    the valid rate stayed near 0.6 (bench/divpo_nouns.py).
    """

    needs = replace(OnlineDPO.needs, reward="noun-diversity")

    def __init__(
        self,
        rho: float = 0.0,
        threshold: float | None = None,
        criterion: str = "frequency",
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = DIVPO_SFT_WEIGHT,
        reference_free: bool = False,
        loss_weights: str | float | list[float] | None = None,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
    ):
        super().__init__(
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight, reference_free=reference_free,
            loss_weights=loss_weights, ld_alpha=ld_alpha, use_weighting=use_weighting, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, sync_ref_model=sync_ref_model,
            ref_model_mixup_alpha=ref_model_mixup_alpha, ref_model_sync_steps=ref_model_sync_steps,
        )
        check_options(rho, criterion)  # a bad option fails before the model loads
        self.selector_options = {"rho": rho, "threshold": threshold, "criterion": criterion}

    def default_selector(self, embedder: Embedder | None = None, reward: RewardSource | None = None) -> PairSelector:
        return DiversePairSelector(**self.selector_options, embedder=embedder, reward=reward)


@hookimpl
def register_objectives(register):
    register("divpo", DivPO)
    register("online-dpo", OnlineDPO)


@hookimpl
def register_pair_selectors(register):
    register("diverse", DiversePairSelector)
    register("best-vs-worst", BestWorstSelector)
