"""The gold rewards on hand-made strings."""

import pytest
import torch
from torch.testing import assert_close

from pref.plugins.default_model import build_default_model
from pref.errors import PrefError
from pref.plugins.gold_rewards import (
    BagOfWords,
    ContrastiveDistillation,
    StepwiseArithmetic,
    UniqueNouns,
    arithmetic_prompts,
    edit_distance,
    reduction_steps,
    worked_solution,
)
from pref.policy import HFPolicy
from pref.registry import load_registry


def test_bag_of_words_counts_each_listed_word_once(tmp_path):
    reward = BagOfWords(words=["river", "Green"])
    texts = ["The river is green, the river!", "rivers are greener", "nothing here", "GREEN."]
    assert reward.score(["p"] * 4, texts)["reward"].tolist() == [2.0, 0.0, 0.0, 1.0]
    path = tmp_path / "words.txt"
    path.write_text("sea\nsun tree\n")
    assert BagOfWords(words=str(path)).score(["p"], ["the sun and the sea and the sun"])["reward"].tolist() == [2.0]
    with pytest.raises(PrefError, match="no such file"):
        BagOfWords(words=str(tmp_path / "missing.txt"))


def test_bag_of_words_default_list_is_among_the_default_models_words():
    from pref.plugins.default_model import english_words

    assert set(BagOfWords.DEFAULT_WORDS) <= set(english_words())  # the frequent words its tokenizer and chats draw on
    assert BagOfWords.default_prompts and BagOfWords().score(["p"], ["the river is quiet and i like it."])["reward"].item() == 2.0


def test_unique_nouns_counts_distinct_common_nouns():
    """"the", "and" are stop words; "good" is an adjective, "run" mostly a verb, "anna" a first name."""
    reward = UniqueNouns()
    texts = ["the apple, the house and the water.", "apple apple APPLE", "good run anna", ""]
    assert reward.score(["p"] * 4, texts)["reward"].tolist() == [3.0, 1.0, 0.0, 0.0]


def test_stepwise_arithmetic_worked_solution():
    assert reduction_steps("3 + 4 * 2") == ["3 + 8", "11"]
    assert worked_solution("3 + 4 * 2") == "3 + 8 = 11"
    assert worked_solution("9 - 2 - 3 * 2") == "9 - 2 - 6 = 7 - 6 = 1"
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0


def test_stepwise_arithmetic_scores_by_hand():
    """Solution steps for "3 + 4 * 2": "3 + 8", "11".

    "3 + 8 = 11" and the same with the expression restated: 0.
    "3 + 9 = 12": one substitution per step: -2.
    "11": "11" vs "3 + 8" is 5 edits (no character shared, 5 long), then the missing "11" costs 2: -7.
    "3+8\\n11\\n11": the extra step "11" costs its length: -2.
    """
    reward = StepwiseArithmetic()
    texts = ["3 + 8 = 11", "3 + 4 * 2 = 3 + 8 = 11", "3 + 9 = 12", "11", "3+8\n11\n11"]
    scores = reward.score(["3 + 4 * 2"] * 5, texts)
    assert scores["reward"].tolist() == [0.0, 0.0, -2.0, -7.0, -2.0]
    assert scores["correct"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    with pytest.raises(PrefError, match="no expression"):
        reward.score(["Hello!"], ["hi"])


def test_stepwise_arithmetic_default_prompts_are_fixed():
    prompts = arithmetic_prompts()
    assert prompts == arithmetic_prompts() == StepwiseArithmetic.default_prompts
    assert len(set(prompts)) == 64
    for prompt in prompts:
        assert all(0 <= int(t) <= 100 for step in reduction_steps(prompt) for t in step.split() if t.isdigit())
        assert "-" not in reduction_steps(prompt)[-1]  # no negative result


def test_contrastive_distillation_is_the_log_likelihood_difference(tmp_path, tiny_model_dir):
    small = build_default_model(tmp_path / "small", seed=1, steps=2)
    reward = ContrastiveDistillation(large=tiny_model_dir, small=small, batch_size=2, device="cpu")
    prompts = ["Name a fruit.", "What color is the sky?", "Say something kind."]
    texts = ["apple", "the sky is blue .", "you are a good friend ."]
    scores = reward.score(prompts, texts)
    with torch.no_grad():
        large = HFPolicy.load(tiny_model_dir)
        small_policy = HFPolicy.load(small)
        expected_large = large.logps(large.encode(prompts, texts)).sequence
        expected_small = small_policy.logps(small_policy.encode(prompts, texts)).sequence
    assert_close(scores["logps/large"], expected_large, atol=1e-4, rtol=0)
    assert_close(scores["reward"], expected_large - expected_small, atol=1e-4, rtol=0)
    same = ContrastiveDistillation(large=tiny_model_dir, small=tiny_model_dir, device="cpu")
    assert_close(same.score(prompts, texts)["reward"], torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(PrefError, match="both models"):
        ContrastiveDistillation(large=tiny_model_dir)


def test_gold_rewards_are_registered():
    registry = load_registry()
    assert registry.create("reward", "bag-of-words", {"words": ["sea"]}).words == {"sea"}
    for name in ("unique-nouns", "contrastive-distillation", "stepwise-arithmetic"):
        assert registry.get("reward", name).package == "pref"
