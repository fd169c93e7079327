"""A*-PO (`a2po`): V* and the loss by hand and against TRL's A2POTrainer; the starting samples, the prompts left out, a resume."""

import json
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pref.config import build_config
from pref.errors import PrefError
from pref.interfaces import CandidatePool, ObjectiveNeeds, RewardSource
from pref.plugins.a2po import A2PO, a2po_loss, optimal_values, prompt_key
from pref.train import train
from test_online import registry_with_reward  # tests/ is on sys.path

PROMPTS = ["Name a fruit.", "Name an animal.", "What color is the sky?", [{"role": "user", "content": "Say something kind."}]]
REWARDS = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


def test_optimal_values_by_hand():
    # beta1 0.5: V* = 0.5 * log(mean(exp(2 r))); two of four right: 0.5 * log((2 + 2 e^2) / 4); none: 0; all: 1
    values = optimal_values(REWARDS, 0.5)
    assert values.tolist() == pytest.approx([0.5 * math.log((1 + math.e ** 2) / 2), 0.0, 1.0, 0.5 * math.log((3 + math.e ** 2) / 4)], abs=1e-6)
    # a large beta1 tends to the mean reward, a small one to the best
    assert optimal_values(REWARDS, 1e3).tolist() == pytest.approx([0.5, 0.0, 1.0, 0.25], abs=1e-3)
    assert optimal_values(REWARDS, 1e-3).tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0], abs=2e-3)


def test_loss_by_hand():
    # beta2 0.5: implicit rewards 0.5 * (-1 - -3) = 1 and 0.5 * (-4 - -2) = -1; advantages 1 - 0.25 = 0.75 and 0 - 0.5 = -0.5
    # loss = ((1 - 0.75)^2 + (-1 + 0.5)^2) / 2 = (0.0625 + 0.25) / 2 = 0.15625; d loss / d logp = beta2 * (ir - a) = 0.125, -0.25
    policy = torch.tensor([-1.0, -4.0], requires_grad=True)
    loss, implicit, advantage = a2po_loss(policy, torch.tensor([-3.0, -2.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5]), 0.5)
    assert loss.item() == pytest.approx(0.15625)
    assert implicit.tolist() == [1.0, -1.0] and advantage.tolist() == [0.75, -0.5]
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([0.125, -0.25])


def trl_a2po_loss(policy_logps, reference_logps, rewards, values, beta2):
    a2po = pytest.importorskip("trl.experimental.a2po")
    trainer = object.__new__(a2po.A2POTrainer)
    trainer.args = SimpleNamespace(beta2=beta2)
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._get_sequence_logps = lambda model, input_ids, attention_mask, logits_to_keep: policy_logps
    inputs = {"input_ids": None, "attention_mask": None, "logits_to_keep": 1, "ref_logps": reference_logps, "rewards": rewards, "v_star": values}
    return trainer.compute_loss(None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("beta2", [1e-3, 0.1])
def test_loss_matches_trl(beta2):
    generator = torch.Generator().manual_seed(0)
    policy = (-20 * torch.rand(6, generator=generator)).requires_grad_()
    reference, rewards, values = -20 * torch.rand(6, generator=generator), torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.rand(6, generator=generator)
    loss, implicit, advantage = a2po_loss(policy, reference, rewards, values, beta2)
    theirs, metrics = trl_a2po_loss(policy, reference, rewards, values, beta2)
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert implicit.mean().item() == pytest.approx(metrics["implicit_reward"][0], rel=1e-6)
    assert advantage.mean().item() == pytest.approx(metrics["advantage"][0], rel=1e-6)
    assert torch.allclose(*[torch.autograd.grad(value, policy)[0] for value in (loss, theirs)])


class Generates(torch.nn.Module):
    """TRL's reference model for Stage 1: each prompt's ids, then two token ids, `num_return_sequences` times."""

    is_gradient_checkpointing = False

    def generate(self, input_ids, attention_mask, generation_config):
        rows = input_ids.repeat_interleave(generation_config.num_return_sequences, dim=0)
        return torch.cat([rows, torch.full((len(rows), 2), 5)], dim=1)


def trl_optimal_values(prompts, rewards, beta1, filter_all_incorrect, tokenizer):
    """TRL's Stage 1 (`_estimate_optimal_values`) on `prompts` whose samples earn `rewards` [P, N]: its V* per prompt, and the prompts it keeps."""
    a2po = pytest.importorskip("trl.experimental.a2po")
    import datasets
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GenerationConfig

    AcceleratorState._reset_state()
    n = rewards.shape[1]
    trainer = object.__new__(a2po.A2POTrainer)
    trainer.args = SimpleNamespace(beta1=beta1, num_value_samples=n, per_device_train_batch_size=3, max_prompt_length=64,
                                   filter_all_incorrect=filter_all_incorrect)
    trainer.train_dataset, trainer.eval_dataset = datasets.Dataset.from_dict({"prompt": prompts}), None
    trainer.accelerator, trainer.processing_class, trainer.ref_model = Accelerator(cpu=True), tokenizer, Generates()
    trainer.value_generation_config = GenerationConfig(num_return_sequences=n, do_sample=True)
    by_prompt = {prompt: row for prompt, row in zip(prompts, rewards.tolist())}
    trainer.reward_funcs = [lambda prompts, completions, **kwargs: [by_prompt[p][i % n] for i, p in enumerate(prompts)]]
    trainer.reward_weights = torch.ones(1)
    trainer._estimate_optimal_values()
    return trainer._optimal_values, list(trainer.train_dataset["prompt"])


@pytest.mark.parametrize("beta1, filter_all_incorrect", [(0.5, True), (2.0, True), (0.5, False)])
def test_optimal_values_and_prompts_kept_match_trl(beta1, filter_all_incorrect, tiny_model_dir):
    from transformers import AutoTokenizer

    prompts = PROMPTS[:3] + ["Name a colour."]  # TRL keys V* by the prompt's text
    values, kept_by_trl = trl_optimal_values(prompts, REWARDS, beta1, filter_all_incorrect, AutoTokenizer.from_pretrained(tiny_model_dir))
    objective = A2PO(num_value_samples=4, beta1=beta1, filter_all_incorrect=filter_all_incorrect)
    kept = objective.start(CandidatePool(prompts, [["a"] * 4] * 4, {"reward": REWARDS}))
    assert [p for p, keep in zip(prompts, kept) if keep] == kept_by_trl
    assert [objective.values[prompt_key(p)] for p in prompts] == pytest.approx([values[p] for p in prompts], rel=1e-6, abs=1e-7)


def test_start_leaves_out_the_prompts_whose_samples_all_scored_zero():
    objective = A2PO(num_value_samples=4)
    assert objective.needs == ObjectiveNeeds(reference="logps", data="samples", online=True, samples_per_prompt=1, starting_samples=4, dropout=True,
                                             dataset_builder="prompts")
    assert objective.start(CandidatePool(PROMPTS, [["a"] * 4] * 4, {"reward": REWARDS})) == [True, False, True, True]
    assert set(objective.state_dict()["values"]) == {prompt_key(p) for p in PROMPTS}  # chat messages have a key too
    with pytest.raises(PrefError, match=r"each of the 4 training prompts' 4 samples .* scored 0.*filter_all_incorrect=false"):
        objective.start(CandidatePool(PROMPTS, [["a"] * 4] * 4, {"reward": torch.zeros(4, 4)}))
    for options, message in [({"num_value_samples": 0}, "num_value_samples must be a whole number"), ({"beta1": 0.0}, "beta1"), ({"beta2": -1.0}, "beta2")]:
        with pytest.raises(PrefError, match=message):
            A2PO(**options)


class NotTheSky(RewardSource):
    """0 for every answer to a prompt about the sky, else 1 for an answer of one word."""

    default_prompts = ["Name a fruit.", "What color is the sky?", "Name an animal."]

    def score(self, prompts, completions):
        return {"reward": torch.tensor([0.0 if "sky" in p else float(len(c.split()) == 1) for p, c in zip(prompts, completions)])}


@pytest.fixture
def sky_registry():
    return registry_with_reward("not-the-sky", NotTheSky)


def a2po_config(out, model, **flags):
    return build_config(flags={"objective": "a2po", "reward": "not-the-sky", "model": model, "steps": 4, "batch_size": 2, "max_new_tokens": 6,
                               "lr": 1e-3, "device": "cpu", "output_dir": str(out), "objective_options": {"num_value_samples": 3, "beta2": 0.1},
                               **flags})


def test_a_run_samples_each_prompt_before_training_and_never_trains_on_the_one_left_out(tmp_path, tiny_model_dir, sky_registry, monkeypatch):
    from pref.policy import HFPolicy

    drawn = []
    sample = HFPolicy.sample
    monkeypatch.setattr(HFPolicy, "sample", lambda self, prompts, k, sampling: drawn.append((list(prompts), k)) or sample(self, prompts, k, sampling))
    out = train(a2po_config(tmp_path / "run", tiny_model_dir, log_completions=True), sky_registry)
    assert drawn[0] == (["Name a fruit.", "What color is the sky?"], 3) and drawn[1] == (["Name an animal."], 3)  # batch_size at a time
    assert all(k == 1 and "What color is the sky?" not in prompts for prompts, k in drawn[2:]) and len(drawn) == 6
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"loss", "v_star", "implicit_reward", "advantage", "reward"} <= set(metrics[-1])
    rows = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    assert {row["prompt"] for row in rows} == {"Name a fruit.", "Name an animal."}


def test_a_resumed_run_keeps_its_starting_estimates_and_ends_as_the_uninterrupted_one(tmp_path, tiny_model_dir, sky_registry, interrupted_after,
                                                                                       monkeypatch):
    from safetensors.torch import load_file

    whole = train(a2po_config(tmp_path / "whole", tiny_model_dir, save_every=2), sky_registry)
    with interrupted_after(3):
        train(a2po_config(tmp_path / "resumed", tiny_model_dir, save_every=2), sky_registry)
    state = json.load(open(tmp_path / "resumed" / "checkpoint-000002" / "state.json"))
    assert state["dropped_prompts"] == [1]
    monkeypatch.setattr(A2PO, "start", lambda self, pool: pytest.fail("a resume samples the starting prompts again"))
    resumed = train(a2po_config(tmp_path / "resumed", tiny_model_dir, save_every=2, resume=str(tmp_path / "resumed")), sky_registry)
    expected, got = (load_file(os.path.join(out, "final", "model.safetensors")) for out in (whole, resumed))
    assert all(torch.equal(expected[key], got[key]) for key in expected)
