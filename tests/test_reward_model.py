"""The reward-model objective (Bradley-Terry) and the reward that scores with a saved reward model."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification

from pref.config import build_config
from pref.errors import PrefError
from pref.interfaces import PairBatch
from pref.models import SCORE_HEAD, load_model, quiet_new_heads
from pref.plugins.reward_model import RewardModelReward, bradley_terry_loss, pair_scores, sequence_scores
from pref.policy import HFPolicy
from pref.registry import load_registry
from pref.train import train
from test_lora import LoadReports  # tests/ is on sys.path


def test_bradley_terry_loss_by_hand():
    """chosen - rejected = 1, 0, -1:

    -log sigmoid(1)  = log(1 + e^-1) = 0.31326
    -log sigmoid(0)  = log 2         = 0.69315
    -log sigmoid(-1) = log(1 + e^1)  = 1.31326
    With margin 1 each difference drops by 1: log(1 + e^0), log(1 + e^1), log(1 + e^2) = 0.69315, 1.31326, 2.12693.
    Centering 0.1 x (chosen + rejected)^2 adds 0.1 x 1, 0.1 x 0, 0.1 x 25 = 0.1, 0, 2.5.
    """
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    assert_close(bradley_terry_loss(chosen, rejected), torch.tensor([0.31326, 0.69315, 1.31326]), atol=1e-5, rtol=0)
    assert_close(bradley_terry_loss(chosen, rejected, margin=1.0), torch.tensor([0.69315, 1.31326, 2.12693]), atol=1e-5, rtol=0)
    assert_close(bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1),
                 torch.tensor([0.41326, 0.69315, 3.81326]), atol=1e-5, rtol=0)


def test_pair_scores_equal_scoring_each_side_alone(tiny_model_dir):
    """One forward pass over chosen + rejected rows gives each row's own score, whatever the padding."""
    classifier = HFPolicy.load(tiny_model_dir, kind="sequence-classifier")
    prompts = ["Name a fruit.", "What color is the sky?"]
    chosen = classifier.encode(prompts, ["apple", "the sky is blue ."])
    rejected = classifier.encode(prompts, ["the big green chair", "green"])
    with torch.no_grad():
        together = pair_scores(classifier.model, PairBatch(chosen, rejected), classifier.tokenizer.pad_token_id)
        assert_close(together[0], sequence_scores(classifier.model, chosen), atol=1e-5, rtol=0)
        assert_close(together[1], sequence_scores(classifier.model, rejected), atol=1e-5, rtol=0)


def test_reward_model_run_and_the_reward_that_loads_it(tmp_path, tiny_model_dir, prefs_file):
    config = build_config(flags={"objective": "reward-model", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 6,
                                 "batch_size": 3, "lr": 1e-3, "device": "cpu", "output_dir": str(tmp_path / "rm")})
    with LoadReports() as reports:
        out = train(config, load_registry())
    assert reports == []  # the score head is new because it is trained from scratch: transformers' notice would alarm
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "mean_reward"} <= set(lines[0])
    assert not {"rewards/chosen", "rewards/rejected"} & set(lines[0])  # DPO's implicit rewards' names: the report drew them as such
    assert lines[-1]["loss"] < lines[0]["loss"]
    final = os.path.join(out, "final")
    assert AutoModelForSequenceClassification.from_pretrained(final).config.num_labels == 1

    reward = load_registry().create("reward", "reward-model", {"model": final, "device": "cpu", "batch_size": 2})
    rows = [json.loads(line) for line in open(prefs_file)]
    prompts = [r["prompt"] for r in rows]
    chosen = reward.score(prompts, [r["chosen"] for r in rows])["reward"]
    rejected = reward.score(prompts, [r["rejected"] for r in rows])["reward"]
    assert chosen.shape == (len(rows),) and chosen.dtype == torch.float32
    # scored in batches of 2 as in one pass with the policy's encoding
    classifier = HFPolicy.load(final, kind="sequence-classifier")
    with torch.no_grad():
        assert_close(chosen, sequence_scores(classifier.model.eval(), classifier.encode(prompts, [r["chosen"] for r in rows])), atol=1e-5, rtol=0)
    assert (chosen > rejected).float().mean() >= 0.5  # it learned something of its 6 pairs


def test_a_load_report_about_more_than_the_new_head_is_kept_whole(tmp_path, tiny_model_dir):
    for name in os.listdir(tiny_model_dir):
        shutil.copy(os.path.join(tiny_model_dir, name), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]  # a checkpoint that lacks more than the head the reward model adds
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with LoadReports() as reports, quiet_new_heads({SCORE_HEAD}):
        HFPolicy.load(str(tmp_path), kind="sequence-classifier")
        HFPolicy.load(tiny_model_dir, kind="sequence-classifier")  # only the head is new: no report
    assert len(reports) == 1 and "model.norm.weight" in reports[0] and "score.weight" in reports[0] and "MISSING" in reports[0]


def test_a_classifier_from_an_lm_with_an_untied_head_loads_without_a_report(tmp_path):
    """Llama-3-8B and Qwen2.5-7B keep their output layer apart from the embeddings: a reward model started from one leaves
    `lm_head.weight` out (UNEXPECTED) besides its new score head (MISSING), which is all as it should be."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with LoadReports() as reports, quiet_new_heads({SCORE_HEAD}):
        load_model(str(tmp_path), kind="sequence-classifier")
    assert reports == []
    with LoadReports() as reports, quiet_new_heads(set()):  # a head that is not the one expected new: reported
        load_model(str(tmp_path), kind="sequence-classifier")
    assert len(reports) == 1 and "lm_head.weight" in reports[0] and "score.weight" in reports[0]


def test_reward_model_reward_needs_a_model():
    with pytest.raises(PrefError, match="model=PATH"):
        RewardModelReward()
