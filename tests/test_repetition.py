"""The repetition reward by hand, and the weighted reward that combines rewards."""

import pytest
import torch
from torch.testing import assert_close

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource
from pref.plugins import repetition
from pref.plugins.repetition import RepetitionReward, repeated_fraction
from pref.plugins.weighted_reward import WeightedReward
from pref.registry import Registry, get_plugin_manager, load_registry


def test_repeated_fraction_by_hand():
    """Bigrams of "a b a b a": ab ba ab ba, the last two seen before: 2 / 4."""
    assert repeated_fraction("a b a b a", 2) == 0.5
    assert repeated_fraction("the cat sat on the mat", 2) == 0.0  # "the" twice, but no bigram twice
    assert repeated_fraction("the cat sat on the mat", 1) == 1 / 6  # unigrams: "the" repeats once in 6
    assert repeated_fraction("The cat the CAT", 2) == 1 / 3  # case is ignored: the-cat, cat-the, the-cat
    assert repeated_fraction("word", 2) == 0.0  # no bigram at all
    assert repeated_fraction("", 1) == 0.0


def test_reward_is_minus_the_repeated_share():
    reward = RepetitionReward(n=2)
    scores = reward.score(["Hi."] * 3, ["go go go go go", "the sky is blue .", "a b a b a"])
    # "go go go go go": 4 bigrams, all "go go", 3 of them repeats
    assert_close(scores["reward"], torch.tensor([-0.75, 0.0, -0.5]))
    assert_close(scores["repetition"], torch.tensor([0.75, 0.0, 0.5]))
    assert RepetitionReward.default_prompts


def test_bad_n_is_an_error():
    with pytest.raises(PrefError, match="n must be"):
        RepetitionReward(n=0)


class Length(RewardSource):
    """Reward = number of words."""

    default_prompts = ["Say a lot.", "Once upon a time"]

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def score(self, prompts, completions):
        return {"reward": self.scale * torch.tensor([float(len(c.split())) for c in completions])}


class LengthPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("length", Length)


@pytest.fixture
def registry():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(repetition)
    pm.register(LengthPlugin(), name="test-length")
    pm.check_pending()
    return Registry(pm)


def test_weighted_sum_by_hand(registry):
    """1.0 x repetition + 0.5 x (2 x words): "a b a b a" is -0.5 + 0.5 x 10 = 4.5; "x y" is 0 + 0.5 x 4 = 2."""
    reward = WeightedReward({"repetition": 1.0, "length": 0.5}, options={"length": {"scale": 2.0}}, registry=registry)
    scores = reward.score(["p", "p"], ["a b a b a", "x y"])
    assert_close(scores["reward"], torch.tensor([4.5, 2.0]))
    assert_close(scores["repetition/reward"], torch.tensor([-0.5, 0.0]))
    assert_close(scores["repetition/repetition"], torch.tensor([0.5, 0.0]))
    assert_close(scores["length/reward"], torch.tensor([10.0, 4.0]))
    # the parts' prompts, in order, each once
    assert reward.default_prompts == RepetitionReward.default_prompts + ["Say a lot."]


def test_weighted_reward_errors(registry):
    with pytest.raises(PrefError, match="mapping of name to weight"):
        WeightedReward({}, registry=registry)
    with pytest.raises(PrefError, match="must be a number"):
        WeightedReward({"repetition": "high"}, registry=registry)
    with pytest.raises(PrefError, match="not among the rewards"):
        WeightedReward({"repetition": 1.0}, options={"length": {}}, registry=registry)
    with pytest.raises(PrefError, match="unknown"):
        WeightedReward({"no-such-reward": 1.0}, registry=registry)


def test_weighted_reward_finds_installed_rewards_by_itself():
    """As `--reward weighted --reward-option rewards='{repetition: 2.0}'` builds it: no registry passed."""
    registry = load_registry()
    assert {"repetition", "weighted"} <= set(registry.names("reward"))
    reward = registry.create("reward", "weighted", {"rewards": {"repetition": 2.0}, "options": {"repetition": {"n": 1}}})
    assert_close(reward.score(["p"], ["go go"])["reward"], torch.tensor([-1.0]))  # 2 x -(1 repeat / 2 unigrams)
