"""The `margin` pair selector: each prompt's best answer against its worst, if they differ enough."""

from __future__ import annotations

from pref import CandidatePool, PairSelector, Selection, hookimpl


class MarginSelector(PairSelector):
    """Best against worst answer of each prompt, when their scores differ by at least `min_margin`.

    Options:
        min_margin: the smallest score gap worth learning from (default 0.5).
        score: which of the reward's scores to compare (default "reward").
    """

    def __init__(self, min_margin: float = 0.5, score: str = "reward"):
        self.min_margin = min_margin
        self.score = score

    def select(self, pool: CandidatePool) -> Selection:
        """One (prompt, chosen k, rejected k) pair per prompt whose scores spread enough."""
        selection = Selection(metrics={"pairs/too_close": 0.0})
        for prompt, scores in enumerate(pool.scores[self.score]):  # [P, K], a row per prompt
            best, worst = int(scores.argmax()), int(scores.argmin())
            if scores[best] - scores[worst] >= self.min_margin:
                selection.pairs.append((prompt, best, worst))
            else:
                selection.metrics["pairs/too_close"] += 1
        return selection


@hookimpl
def register_pair_selectors(register):
    register("margin", MarginSelector)
