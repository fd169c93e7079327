"""DivPO's pair selection and online DPO's best-vs-worst rule, on hand-made pools.

Each pool is one prompt's K samples unless said otherwise. Diversity under the
"probability" criterion is -logps, so the logps below are chosen to make the
ranking easy to read: logps [-1, -3] means diversities [1, 3].
"""

import pytest
import torch

from pref.errors import PrefError
from pref.interfaces import CandidatePool, Embedder, RewardSource
from pref.plugins.divpo import BestWorstSelector, DiversePairSelector, DivPO, OnlineDPO, diversity_scores, quality_bands
from pref.registry import load_registry


def pool(quality, completions, logps=None):
    """A pool of len(quality) prompts; `quality` and `logps` are [P, K] nested lists."""
    return CandidatePool(
        prompts=[f"prompt {p}" for p in range(len(quality))],
        completions=completions,
        scores={"reward": torch.tensor(quality, dtype=torch.float32)},
        logps=None if logps is None else torch.tensor(logps, dtype=torch.float32),
    )


class FixedEmbedder(Embedder):
    """Similarities looked up in a fixed table of pairs; 1.0 on the diagonal."""

    def __init__(self, table):
        self.table = {frozenset(pair): value for pair, value in table.items()}
        self.calls = []

    def similarity(self, texts):
        self.calls.append(list(texts))
        return torch.tensor([[1.0 if a == b else self.table[frozenset((a, b))] for b in texts] for a in texts])


# -- rho = 0: good is the best quality only, bad the worst only ------------------------------


def test_probability_criterion_picks_the_rarest_best_and_the_likeliest_worst():
    # quality   [0.2, 1.0, 1.0, 0.0, 0.0, 0.5]
    # diversity [1,   3,   2,   5,   4,   9  ]  (= -logps)
    # good = {1, 2} (quality 1.0): the most diverse is 1.
    # bad  = {3, 4} (quality 0.0): the least diverse is 4.
    # 5 is the most diverse of all but of middling quality, so it is neither.
    selection = DiversePairSelector(rho=0.0, criterion="probability").select(
        pool([[0.2, 1.0, 1.0, 0.0, 0.0, 0.5]], [["a", "b", "c", "d", "e", "f"]], [[-1, -3, -2, -5, -4, -9]])
    )
    assert selection.pairs == [(0, 1, 4)]
    assert selection.metrics == {"pools/all_good": 0.0, "pools/none_good": 0.0, "pools/all_equal": 0.0, "pools/equal_quality": 0.0}


def test_frequency_criterion_counts_answers_in_the_pool_ignoring_case_and_spaces():
    # answers   sun   dog   "Dog "  dog   owl   owl
    # counts    1     3     3       3     2     2    -> diversity 1/count
    # quality   1.0   1.0   0.0     0.5   0.0   0.0
    # good = {0 (1), 1 (1/3)}: chosen 0, "sun".
    # bad  = {2 (1/3), 4 (1/2), 5 (1/2)}: rejected 2, "Dog ", which counts as "dog".
    selection = DiversePairSelector(criterion="frequency").select(
        pool([[1.0, 1.0, 0.0, 0.5, 0.0, 0.0]], [["sun", "dog", "Dog ", "dog", "owl", "owl"]])
    )
    assert selection.pairs == [(0, 0, 2)]


SIMILARITY = {
    ("a", "b"): 0.9, ("a", "c"): 0.8, ("a", "d"): 0.1,
    ("b", "c"): 0.7, ("b", "d"): 0.4,
    ("c", "d"): 0.6,
}


def test_semantic_criterion_is_the_mean_distance_to_the_other_answers():
    # diversity = sum of (1 - similarity) to the three others / 3:
    #   a: (0.1 + 0.2 + 0.9) / 3 = 0.4    b: (0.1 + 0.3 + 0.6) / 3 = 1/3
    #   c: (0.2 + 0.3 + 0.4) / 3 = 0.3    d: (0.9 + 0.6 + 0.4) / 3 = 1.9/3
    # quality [0, 1, 1, 0]: good = {b, c}, bad = {a, d}.
    # chosen: b (1/3 > 0.3); rejected: a (0.4 < 1.9/3). By diversity alone d would be chosen.
    embedder = FixedEmbedder(SIMILARITY)
    the_pool = pool([[0.0, 1.0, 1.0, 0.0]], [["A", "b", "c ", "d"]])
    torch.testing.assert_close(diversity_scores(the_pool, 0, "semantic", embedder), torch.tensor([0.4, 1 / 3, 0.3, 1.9 / 3]))
    assert embedder.calls == [["a", "b", "c", "d"]]  # normalised before embedding

    selection = DiversePairSelector(criterion="semantic", embedder=embedder).select(the_pool)
    assert selection.pairs == [(0, 1, 0)]


def test_probability_criterion_without_logps_is_an_error():
    with pytest.raises(ValueError, match="log-probs"):
        DiversePairSelector(criterion="probability").select(pool([[1.0, 0.0]], [["a", "b"]]))


# -- rho > 0: bands of the quality range ------------------------------------------------------


@pytest.mark.parametrize(
    "rho, pair",
    [
        # quality   [0,  0.2, 0.5, 0.9, 1.0], range 1.0
        # diversity [2,  1,   6,   3,   4  ]
        # rho=0:    good {4} -> 4;              bad {0} -> 0
        (0.0, (0, 4, 0)),
        # rho=0.25: good >= 0.75: {3, 4} -> 4;   bad <= 0.25: {0, 1} -> 1 (diversity 1)
        (0.25, (0, 4, 1)),
        # rho=0.5:  good >= 0.5: {2, 3, 4} -> 2 (diversity 6); bad <= 0.5 and not good: {0, 1} -> 1
        (0.5, (0, 2, 1)),
    ],
)
def test_rho_widens_the_good_and_bad_bands(rho, pair):
    selection = DiversePairSelector(rho=rho).select(pool([[0.0, 0.2, 0.5, 0.9, 1.0]], [["a", "b", "c", "d", "e"]], [[-2, -1, -6, -3, -4]]))
    assert selection.pairs == [pair]


def test_quality_bands_masks():
    quality = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    good, bad = quality_bands(quality, 0.5, None)
    assert good.tolist() == [False, False, True, True, True]
    assert bad.tolist() == [True, True, False, False, False]
    good, bad = quality_bands(quality, 0.0, 0.9)
    assert good.tolist() == [False, False, False, True, True]
    assert bad.tolist() == [True, True, True, False, False]


def test_a_sample_in_both_bands_is_only_good():
    # quality [0, 0.5, 1.0] with rho=0.5: 0.5 is within half the range of both ends.
    # diversity [5, 4, 3]: as good, 1 is the most diverse and is chosen.
    # Were it also bad it would be the least diverse bad one too: it would be paired with
    # itself. Only 0 is bad, so the pair is 1 over 0, the better answer over the worse.
    selection = DiversePairSelector(rho=0.5).select(pool([[0.0, 0.5, 1.0]], [["a", "b", "c"]], [[-5, -4, -3]]))
    assert selection.pairs == [(0, 1, 0)]


# -- an absolute threshold instead of bands ----------------------------------------------------


def test_threshold_splits_good_from_bad():
    # quality   [0.3, 0.6, 0.8, 0.1], threshold 0.5: good {1, 2}, bad {0, 3}
    # diversity [1,   2,   1,   3  ]: chosen 1 (2 > 1), rejected 0 (1 < 3).
    # Without the threshold (rho=0) the pair would be 2 over 3.
    the_pool = pool([[0.3, 0.6, 0.8, 0.1]], [["a", "b", "c", "d"]], [[-1, -2, -1, -3]])
    assert DiversePairSelector(threshold=0.5).select(the_pool).pairs == [(0, 1, 0)]
    assert DiversePairSelector().select(the_pool).pairs == [(0, 2, 3)]


# -- edge cases and their counts ---------------------------------------------------------------


def test_all_samples_valid_pairs_the_most_and_least_diverse():
    # threshold 0.5, quality [0.9, 0.6, 0.7]: all good, none bad.
    # diversity [1, 3, 2]: the most diverse (1) over the least diverse (0).
    selection = DiversePairSelector(threshold=0.5).select(pool([[0.9, 0.6, 0.7]], [["a", "b", "c"]], [[-1, -3, -2]]))
    assert selection.pairs == [(0, 1, 0)]
    assert selection.metrics == {"pools/all_good": 1.0, "pools/none_good": 0.0, "pools/all_equal": 0.0, "pools/equal_quality": 0.0}


def test_no_sample_valid_gives_no_pair():
    selection = DiversePairSelector(threshold=0.5).select(pool([[0.1, 0.2, 0.0]], [["a", "b", "c"]], [[-1, -3, -2]]))
    assert selection.pairs == []
    assert selection.metrics == {"pools/all_good": 0.0, "pools/none_good": 1.0, "pools/all_equal": 0.0, "pools/equal_quality": 0.0}


def test_all_answers_equal_gives_no_pair():
    # different qualities, but "Cat", "cat " and "cat" are the same answer
    selection = DiversePairSelector().select(pool([[0.0, 1.0, 0.5]], [["Cat", "cat ", "cat"]], [[-1, -3, -2]]))
    assert selection.pairs == []
    assert selection.metrics == {"pools/all_good": 0.0, "pools/none_good": 0.0, "pools/all_equal": 1.0, "pools/equal_quality": 0.0}


def test_equal_quality_without_a_threshold_gives_no_pair():
    # quality [1, 1, 1, 1] and no pass mark: these may all be good or all bad, so no pair
    selection = DiversePairSelector().select(pool([[1.0, 1.0, 1.0, 1.0]], [["cat", "dog", "sun", "owl"]], [[-2, -1, -4, -3]]))
    assert selection.pairs == []
    assert selection.metrics["pools/equal_quality"] == 1.0


def test_the_rewards_pass_mark_is_the_default_threshold():
    # a 0/1 reward with quality_threshold 0.5: all four are good.
    # diversity [2, 1, 4, 3]: the most diverse (2) over the least diverse (1).
    class PassMark(RewardSource):
        quality_threshold = 0.5

        def score(self, prompts, completions):
            raise NotImplementedError

    selector = DiversePairSelector(reward=PassMark())
    selection = selector.select(pool([[1.0, 1.0, 1.0, 1.0]], [["cat", "dog", "sun", "owl"]], [[-2, -1, -4, -3]]))
    assert selection.pairs == [(0, 2, 1)]
    assert selection.metrics["pools/all_good"] == 1.0
    # none good: no pair
    selection = selector.select(pool([[0.0, 0.0]], [["cat", "dog"]], [[-2, -1]]))
    assert selection.pairs == [] and selection.metrics["pools/none_good"] == 1.0


def test_all_good_and_equally_diverse_gives_no_pair():
    # every answer appears once, so every frequency diversity is 1: nothing to prefer
    selection = DiversePairSelector(criterion="frequency", threshold=0.5).select(pool([[1.0, 1.0, 1.0]], [["cat", "dog", "sun"]]))
    assert selection.pairs == []
    assert selection.metrics == {"pools/all_good": 0.0, "pools/none_good": 0.0, "pools/all_equal": 1.0, "pools/equal_quality": 0.0}


def test_each_prompt_of_a_pool_is_counted_once():
    # prompt 0: an ordinary pool, 1 over 0.  prompt 1: all answers equal.
    # prompt 2: none reaches the threshold.  prompt 3: all reach it, 0 over 1.
    selection = DiversePairSelector(threshold=0.5).select(
        pool(
            [[0.0, 1.0], [0.0, 1.0], [0.1, 0.2], [0.7, 0.8]],
            [["a", "b"], ["c", "c"], ["d", "e"], ["f", "g"]],
            [[-1, -2], [-1, -2], [-1, -2], [-2, -1]],
        )
    )
    assert selection.pairs == [(0, 1, 0), (3, 0, 1)]
    assert selection.metrics == {"pools/all_good": 1.0, "pools/none_good": 1.0, "pools/all_equal": 1.0, "pools/equal_quality": 0.0}


def test_an_unknown_score_name_is_an_error():
    with pytest.raises(PrefError, match="no score named 'quality'"):
        DiversePairSelector(score="quality").select(pool([[1.0, 0.0]], [["a", "b"]], [[-1, -2]]))
    with pytest.raises(PrefError, match="no score named 'quality'"):
        BestWorstSelector(score="quality").select(pool([[1.0, 0.0]], [["a", "b"]]))


# -- online DPO: best vs worst -------------------------------------------------------------------


def test_best_vs_worst_pairs_the_highest_reward_with_the_lowest():
    # prompt 0: best 1 (0.9), worst 2 (0.1).  prompt 1: all equal, skipped.
    selection = BestWorstSelector().select(pool([[0.2, 0.9, 0.1, 0.5], [0.5, 0.5, 0.5, 0.5]], [list("abcd"), list("efgh")]))
    assert selection.pairs == [(0, 1, 2)]
    assert selection.metrics == {"pools/all_equal": 1.0}


def test_best_vs_worst_breaks_ties_at_random_but_reproducibly():
    # best: 0, 1 and 4 tie at 1.0; worst: 2 and 3 tie at 0.0
    the_pool = pool([[1.0, 1.0, 0.0, 0.0, 1.0]], [list("abcde")])

    def pair(seed):
        torch.manual_seed(seed)
        return BestWorstSelector().select(the_pool).pairs[0]

    assert pair(3) == pair(3)
    pairs = [pair(seed) for seed in range(50)]
    assert {chosen for _, chosen, _ in pairs} == {0, 1, 4}
    assert {rejected for _, _, rejected in pairs} == {2, 3}


# -- options, defaults and registration -------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"criterion": "entropy"}, "unknown diversity criterion 'entropy'"),
    ({"rho": -0.1}, "rho must lie in"),
    ({"rho": 0.6}, "rho must lie in"),  # the bands would overlap
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(PrefError, match=message):
        DiversePairSelector(**options)
    with pytest.raises(PrefError, match=message):
        DivPO(**options)  # before any model is loaded
    with pytest.raises(PrefError, match=message):
        load_registry().create("objective", "divpo", options)


def test_divpo_default_selector_uses_its_options():
    embedder = FixedEmbedder(SIMILARITY)
    selector = DivPO(rho=0.25, criterion="semantic").default_selector(embedder=embedder)
    assert isinstance(selector, DiversePairSelector)
    assert (selector.rho, selector.threshold, selector.criterion, selector.embedder) == (0.25, None, "semantic", embedder)
    assert not selector.needs_logps

    selector = DivPO(threshold=0.5, criterion="frequency").default_selector()
    assert (selector.rho, selector.threshold, selector.criterion) == (0.0, 0.5, "frequency")

    selector = DivPO().default_selector()
    assert (selector.rho, selector.threshold, selector.criterion) == (0.0, None, "frequency")
    assert not selector.needs_logps


def test_online_objectives_declare_what_they_need():
    divpo, online_dpo = DivPO(), OnlineDPO()
    assert divpo.needs.online and online_dpo.needs.online
    assert (divpo.needs.samples_per_prompt, divpo.needs.data) == (8, "pairs")
    assert divpo.needs.reward == "noun-diversity" and online_dpo.needs.reward is None
    assert isinstance(online_dpo.default_selector(), BestWorstSelector)
    assert DivPO(reference_free=True).needs.reference == "none"


def test_registration():
    registry = load_registry()
    assert {"divpo", "online-dpo"} <= set(registry.names("objective"))
    assert {"diverse", "best-vs-worst"} <= set(registry.names("pair-selector"))
    embedder = FixedEmbedder(SIMILARITY)
    selector = registry.create("pair-selector", "diverse", {"criterion": "semantic"}, embedder=embedder)
    assert isinstance(selector, DiversePairSelector) and selector.embedder is embedder
    assert isinstance(registry.create("pair-selector", "best-vs-worst", {}, embedder=embedder), BestWorstSelector)
    assert isinstance(registry.create("objective", "divpo", {"rho": 0.1}), DivPO)
