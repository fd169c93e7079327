"""Samples drawn at `--temperature T` are scored at T, as TRL's GRPO, RLOO, distillation and self-distillation trainers score
them: log-probs and entropies of softmax(logits / T), on each path (full logits, lean chunks, packed rows) and in each
objective that trains by policy gradient or distillation on its own samples. Before 2026-12-02 they were scored at 1."""

import copy

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from pref.cli.main import cli
from pref.errors import PrefError
from pref.interfaces import Rollout, ScoredBatch
from pref.plugins.grpo import GRPO
from pref.plugins.ppo import PPO
from pref.plugins.rloo import RLOO
from pref.plugins.sdft import SDFT, token_logps
from pref.plugins.sdpo import SDPO
from pref.policy import HFPolicy
from pref.reference import CachedReference, FrozenReference
from pref.sequences import model_logps

PROMPTS = ["Name a fruit.", "Name a fruit.", "Name an animal.", "Name an animal."]
ANSWERS = ["apple", "a ripe pear", "cat", "the big dog"]


def trls(model, sequences, temperature):
    """TRL's per-token log-probs and entropies of the completion tokens: of the logits divided by the temperature."""
    logits = model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits[:, :-1] / temperature
    mask = sequences.completion_mask.clone()
    mask[:, 0] = 0
    pad = lambda values: torch.nn.functional.pad(values, (1, 0)) * mask  # noqa: E731 (token t is drawn at position t - 1)
    return pad(selective_log_softmax(logits, sequences.input_ids[:, 1:])), pad(entropy_from_logits(logits))


@pytest.mark.parametrize("path", ["lean", "packed", "full"])
def test_log_probs_and_entropies_at_a_temperature_are_trls(tiny_model_dir, path):
    policy = HFPolicy.load(tiny_model_dir)
    model = policy.model.eval()
    sequences = policy.encode(PROMPTS, ANSWERS)
    with torch.no_grad():
        ours = model_logps(model, sequences, with_logits=path == "full", packing=path == "packed", with_entropy=True, temperature=0.7)
        logps, entropy = trls(model, sequences, 0.7)
        at_one = model_logps(model, sequences, with_logits=path == "full", packing=path == "packed")
    assert_close(ours.tokens, logps, atol=2e-5, rtol=0)
    assert_close(ours.entropy, entropy, atol=5e-5, rtol=0)
    assert (ours.tokens - at_one.tokens).abs().max() > 1e-2  # the temperature does change them


def test_references_score_at_the_temperature_and_a_cache_refuses_it(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    sequences = policy.encode(PROMPTS, ANSWERS)
    frozen = FrozenReference(copy.deepcopy(policy.model).eval().requires_grad_(False))
    with torch.no_grad():
        assert_close(frozen.logps(sequences, temperature=0.7).tokens, trls(frozen.model, sequences, 0.7)[0], atol=2e-5, rtol=0)
    with pytest.raises(PrefError, match="log-probs at temperature 0.7, not those cached: use --reference model"):
        CachedReference({}).logps(sequences, temperature=0.7)


def batch_at(policy, temperature):
    sequences = policy.encode(PROMPTS, ANSWERS)
    return ScoredBatch(PROMPTS, ANSWERS, sequences, {"reward": torch.tensor([1.0, 0.0, 0.5, 1.0])}, 2, 8, temperature=temperature,
                       columns={"privileged_context": ["Example: apple", "Example: pear", "Example: cat", "Example: dog"]})


@pytest.mark.parametrize("objective", [
    lambda: GRPO(num_iterations=2, beta=0.1),
    lambda: RLOO(),
    lambda: PPO(),
    lambda: SDFT(num_iterations=2, teacher_model_kind="live"),
    lambda: SDPO(num_iterations=2, teacher_model_kind="live"),
], ids=["grpo", "rloo", "ppo", "sdft", "sdpo"])
def test_objectives_keep_the_sampling_policys_log_probs_at_the_sampling_temperature(tiny_model_dir, objective):
    """The log-probs a rollout keeps of the policy that sampled it (the ratio's denominator, RLOO's and PPO's KL penalty) are at
    the temperature the rollout was drawn at, and the reference's too (GRPO's KL term)."""
    policy = HFPolicy.load(tiny_model_dir)
    policy.model.eval()
    built = objective()
    built.setup(policy)  # PPO's value head
    reference = FrozenReference(copy.deepcopy(policy.model).eval().requires_grad_(False))
    batch = batch_at(policy, 0.7)
    rows = Rollout(batch).prepared(built, policy, reference)
    kept = rows.logps if isinstance(built, PPO) else rows.old_logps
    with torch.no_grad():
        expected = trls(policy.model, batch.sequences, 0.7)[0]
    assert_close(kept.float(), expected, atol=2e-5, rtol=0)
    if isinstance(built, GRPO):
        assert_close(rows.reference_logps, expected, atol=2e-5, rtol=0)  # the reference is the starting policy


def test_sdft_follows_the_sampling_temperature_unless_told_another(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    policy.model.eval()
    batch = batch_at(policy, 0.7)
    with torch.no_grad():
        own = Rollout(batch).prepared(SDFT(num_iterations=2, teacher_model_kind="live", temperature=1.3), policy, None).old_logps
        assert_close(own, token_logps(policy, batch.sequences, 1.3))


def test_an_online_run_hands_its_objective_the_sampling_temperature(tmp_path, tiny_model_dir, monkeypatch):
    seen = []
    prepare = GRPO.prepare

    def spy(self, policy, reference, batch):
        seen.append(batch.temperature)
        return prepare(self, policy, reference, batch)

    monkeypatch.setattr(GRPO, "prepare", spy)
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--objective", "grpo", "--model", tiny_model_dir,
                                      "--reward", "noun-diversity", "--steps", "2", "--batch-size", "2", "--samples-per-prompt", "2",
                                      "--temperature", "0.7", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert seen == [0.7, 0.7]

