"""PPO's maths by hand, rollout reuse, and short online runs with a value head."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from pref.config import build_config
from pref.data import RolloutSteps
from pref.errors import PrefError
from pref.interfaces import Minibatch, Objective, ScoredBatch
from pref.plugins.ppo import PPO, AdaptiveKLController, gae, kl_penalty, masked_whiten, policy_loss, token_rewards, value_loss
from pref.registry import load_registry
from pref.train import train


# -- the maths ------------------------------------------------------------------------------------


def test_gae_by_hand():
    """gamma = 0.9, lam = 0.8, so gamma x lam = 0.72; the episode ends after the last completion token.

    Row 0: a prompt token, 3 completion tokens, a padding token; rewards 0, 0, 1; values 0.5, 0.6, 0.7
        t=3: delta = 1 + 0           - 0.7 = 0.3    A = 0.3
        t=2: delta = 0 + 0.9 x 0.7   - 0.6 = 0.03   A = 0.03 + 0.72 x 0.3   = 0.246
        t=1: delta = 0 + 0.9 x 0.6   - 0.5 = 0.04   A = 0.04 + 0.72 x 0.246 = 0.21712
        returns = A + V = 0.71712, 0.846, 1.0
    Row 1: two prompt tokens, 2 completion tokens; rewards -0.1, 2; values 1.0, 1.5
        t=3: delta = 2 - 1.5 = 0.5                          A = 0.5
        t=2: delta = -0.1 + 0.9 x 1.5 - 1.0 = 0.25          A = 0.25 + 0.72 x 0.5 = 0.61
        returns = 1.61, 2.0
    Values outside the mask (9.0) must not leak in.
    """
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, -0.1, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0], [9.0, 9.0, 1.0, 1.5, 9.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[0.0, 0.21712, 0.246, 0.3, 0.0], [0.0, 0.0, 0.61, 0.5, 0.0]]))
    assert_close(returns, torch.tensor([[0.0, 0.71712, 0.846, 1.0, 0.0], [0.0, 0.0, 1.61, 2.0, 0.0]]))


def test_masked_whiten_by_hand():
    """Over the masked 1, 2, 3: mean 2, unbiased variance ((-1)^2 + 0 + 1^2) / 2 = 1, so -1, 0, 1; 0 elsewhere."""
    values = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_token_rewards_by_hand():
    """kl_coef 0.5: -0.5 x kl on completion tokens, plus the score on the last one (1 + -0.5 x 0.4 = 0.8)."""
    kl = torch.tensor([[7.0, 0.2, 0.4, 7.0], [7.0, 7.0, 0.1, 7.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    assert_close(rewards, torch.tensor([[0.0, -0.1, 0.8, 0.0], [0.0, 0.0, -2.05, 0.0]]))


def test_both_kl_estimators_by_hand():
    """p = 0.5, ref = 0.25: k1 = log 2 = 0.693147; r = ref / p = 0.5, k3 = (r - 1) - log r = -0.5 + log 2 = 0.193147.
    p = 0.25, ref = 0.5: k1 = -log 2 = -0.693147; r = 2, k3 = 1 - log 2 = 0.306853. Equal: both 0.
    """
    logps = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    reference = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    assert_close(kl_penalty(logps, reference, "k1"), torch.tensor([0.693147, -0.693147, 0.0]))
    assert_close(kl_penalty(logps, reference, "k3"), torch.tensor([0.193147, 0.306853, 0.0]))
    with pytest.raises(PrefError, match="kl_estimator"):
        kl_penalty(logps, reference, "k2")


def test_clipped_policy_loss_by_hand():
    """cliprange 0.2; per token max(-A x ratio, -A x clip(ratio, 0.8, 1.2)):

    ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2   clipped
    ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5
    ratio 0.5, A = -1: max( 0.5,  0.8) =  0.8   clipped
    ratio 1.1, A = -2: max( 2.2,  2.2) =  2.2
    mean (-1.2 - 0.5 + 0.8 + 2.2) / 4 = 0.325; 2 of 4 clipped. The fifth token is masked out.
    """
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.1, 50.0]])
    old = torch.full_like(ratios, -1.0)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac = policy_loss(old + ratios.log(), old, advantages, mask, cliprange=0.2)
    assert_close(loss, torch.tensor(0.325))
    assert_close(clipfrac, torch.tensor(0.5))


def test_clipped_value_loss_by_hand():
    """cliprange_value 0.2; V_clip = old + clip(V - old, -0.2, 0.2):

    old 1.0, V  1.5, R 2.0: V_clip  1.2; max((1.5 - 2)^2, (1.2 - 2)^2) = max(0.25, 0.64) = 0.64  clipped
    old 1.0, V  1.1, R 0.0: V_clip  1.1; max(1.21, 1.21) = 1.21
    old 0.0, V -0.5, R 0.0: V_clip -0.2; max(0.25, 0.04) = 0.25
    0.5 x (0.64 + 1.21 + 0.25) / 3 = 0.35; 1 of 3 clipped.
    """
    values = torch.tensor([[1.5, 1.1, -0.5, 3.0]])
    old = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert_close(loss, torch.tensor(0.35))
    assert_close(clipfrac, torch.tensor(1 / 3))


def test_adaptive_kl_controller_by_hand():
    """target 6, horizon 10000. KL 9: e = clip(9/6 - 1) = clip(0.5) = 0.2; 256 samples: 0.2 x (1 + 0.2 x 0.0256) = 0.201024.
    KL 5.4: e = -0.1; 1000 samples: 0.201024 x (1 - 0.1 x 0.1) = 0.19901376.
    """
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(9.0, 256)
    assert math.isclose(controller.value, 0.201024, rel_tol=1e-9)
    controller.update(5.4, 1000)
    assert math.isclose(controller.value, 0.19901376, rel_tol=1e-9)
    fixed = AdaptiveKLController(0.2, target=None, horizon=10000)
    fixed.update(100.0, 256)
    assert fixed.value == 0.2


def test_options_are_checked():
    assert PPO(target_kl="none").kl.target is None
    needs = PPO(ppo_epochs=3, minibatches=2).needs
    assert (needs.epochs_per_rollout, needs.minibatches_per_rollout) == (3, 2)
    assert (PPO.needs.epochs_per_rollout, PPO.needs.minibatches_per_rollout) == (1, 1)  # per instance, not for the class
    for bad in ({"kl_estimator": "k2"}, {"gamma": 1.5}, {"cliprange": 0}, {"ppo_epochs": 0}, {"target_kl": -1.0}):
        with pytest.raises(PrefError, match="ppo"):
            PPO(**bad)
    assert load_registry().get("objective", "ppo").factory is PPO


# -- rollout reuse --------------------------------------------------------------------------------


class Counter:
    """An order that counts the rollouts it has handed out."""

    def __init__(self):
        self.drawn = 0

    def state(self):
        return {"drawn": self.drawn}

    def load_state(self, state):
        self.drawn = state["drawn"]


class Rows:
    """A batch of `n` numbered rows; `select` keeps the numbers."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __len__(self):
        return len(self.ids)

    def select(self, rows):
        return Rows([self.ids[i] for i in rows.tolist()])


class Preparing(Objective):
    """Counts how often it prepares a rollout."""

    def __init__(self):
        self.prepared = 0

    def prepare(self, policy, reference, batch):
        self.prepared += 1
        assert not torch.is_grad_enabled()
        return Rows([i * 10 for i in batch.ids])

    def loss(self, policy, reference, batch):
        raise AssertionError("not called")


def reuse_steps(epochs=2, minibatches=2, seed=0):
    order = Counter()

    def draw():
        order.drawn += 1
        return Rows(range(5)), {"reward/mean": float(order.drawn), "time/sampling": 1.0}

    return RolloutSteps(draw, order, epochs, minibatches, seed), order


def test_each_rollout_is_served_as_epochs_times_minibatches_steps():
    steps, order = reuse_steps(epochs=2, minibatches=2)
    objective = Preparing()
    served = [steps.next() for _ in range(8)]
    assert order.drawn == 2  # 4 steps per rollout
    first, second = served[:4], served[4:]
    for group, number in ((first, 1.0), (second, 2.0)):
        batches = [b for b, _ in group]
        assert [(b.epoch, b.index) for b in batches] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert all(b.rollout is batches[0].rollout for b in batches)
        for epoch in (batches[:2], batches[2:]):  # each pass covers every row once, in 3 + 2 rows
            assert sorted(r for b in epoch for r in b.rows.tolist()) == [0, 1, 2, 3, 4]
            assert sorted(len(b) for b in epoch) == [2, 3]
        assert [m["reward/mean"] for _, m in group] == [number] * 4
        # the rollout's time is shared by its steps (it was all on the first, and the report's median step showed none)
        assert [m["time/sampling"] for _, m in group] == [0.25] * 4
        rows = [b.prepared(objective, None, None).ids for b in batches]
        assert rows == [[r * 10 for r in b.rows.tolist()] for b in batches]
    assert objective.prepared == 2  # once per rollout
    assert first[0][0].rows.tolist() != first[2][0].rows.tolist()  # reshuffled between passes


def test_resume_mid_rollout_starts_that_rollout_again():
    steps, order = reuse_steps()
    for _ in range(5):
        steps.next()  # a whole rollout and the first step of the second
    state = steps.state()
    assert state == {"drawn": 1, "rollouts": 1}
    following = [steps.next()[0].rows.tolist() for _ in range(3)]

    resumed, resumed_order = reuse_steps()
    resumed.load_state(state)
    assert resumed_order.drawn == 1
    replayed = [resumed.next()[0].rows.tolist() for _ in range(4)]
    assert replayed[1:] == following  # the same mini-batches, from the rollout's first step
    assert resumed_order.drawn == 2
    for _ in range(3):
        steps.next()
    assert steps.state() == {"drawn": 2, "rollouts": 2}  # between rollouts: where the order stands


def test_more_minibatches_than_rows_is_an_error():
    steps, _ = reuse_steps(minibatches=6)
    with pytest.raises(PrefError, match="cannot be cut into 6 mini-batches"):
        steps.next()


def test_one_step_reaches_the_policy_and_the_value_head(tiny_model_dir):
    from pref.interfaces import Rollout
    from pref.policy import HFPolicy
    from pref.reference import FrozenReference

    torch.manual_seed(0)
    policy = HFPolicy.load(tiny_model_dir)
    reference = FrozenReference.copy_of(policy.model)
    objective = PPO(beta=0.1, target_kl=6.0, horizon=100)
    objective.setup(policy)
    prompts, completions = ["Name a fruit."] * 2, ["apple", "the sky is blue ."]
    batch = ScoredBatch(prompts, completions, policy.encode(prompts, completions), {"reward": torch.tensor([1.0, -1.0])})
    step = Minibatch(Rollout(batch), torch.tensor([1, 0]))
    loss, metrics = objective.loss(policy, reference, step)
    loss.backward()
    assert objective.value_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.parameters())
    # the policy is the reference, so KL is 0, below the target: e = -0.2, 0.1 x (1 - 0.2 x 2 / 100) = 0.0996
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5) and metrics["objective/kl_coef"] == 0.1
    assert objective.kl.value == pytest.approx(0.0996)
    assert objective.state_dict() == {"kl_coef": objective.kl.value}


# -- short runs on the tiny model -----------------------------------------------------------------

PPO_METRICS = {"loss", "loss/policy", "loss/value", "objective/kl", "objective/kl_coef", "policy/clipfrac", "value/clipfrac",
               "returns/mean", "advantages/mean", "reward/mean", "samples/distinct_ratio", "time/sampling", "grad_norm"}


def ppo_run(tmp_path, model, name="run", **flags):
    config = build_config(flags={"objective": "ppo", "reward": "repetition", "model": model, "steps": 4, "batch_size": 2,
                                 "max_new_tokens": 8, "device": "cpu", "output_dir": str(tmp_path / name), **flags})
    out = train(config, load_registry())
    return out, [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_ppo_run_trains_policy_and_value_head_and_checkpoints_both(tmp_path, tiny_model_dir):
    out, lines = ppo_run(tmp_path, tiny_model_dir, save_every=2, objective_options={"ppo_epochs": 2, "beta": 0.1})
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for metrics in lines:
        assert PPO_METRICS <= set(metrics)
        assert -1.0 <= metrics["reward/mean"] <= 0.0  # the repetition reward
        assert 0.0 <= metrics["policy/clipfrac"] <= 1.0 and 0.0 <= metrics["value/clipfrac"] <= 1.0
        assert all(math.isfinite(v) for v in metrics.values())
    # 2 epochs per rollout of 2 prompts x 4 samples: steps 1-2 train on one rollout, 3-4 on the next
    assert lines[0]["reward/mean"] == lines[1]["reward/mean"] and lines[0]["ppo/epoch"] == 0 and lines[1]["ppo/epoch"] == 1
    # the first step of a rollout trains on the policy that sampled it: nothing is clipped yet
    assert lines[0]["policy/clipfrac"] == 0.0 and lines[0]["policy/approxkl"] < 1e-6
    assert lines[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert lines[0]["objective/kl_coef"] == 0.1

    checkpoint = os.path.join(out, "checkpoint-000002")
    extra = torch.load(os.path.join(checkpoint, "extra.pt"), weights_only=True)
    assert set(extra["modules"]["value_head"]) == {"weight", "bias"}
    assert extra["objective"][0]["kl_coef"] > 0  # the state of process 0
    state = json.load(open(os.path.join(checkpoint, "state.json")))
    assert state["data"]["rollouts"] == 1  # checkpoints fall between rollouts: a resume draws the second one
    assert load_file(os.path.join(out, "final", "model.safetensors"))  # the policy itself is saved as usual

    # an earlier pref recorded the objective's default reward (repetition) as none: the run is resumed without naming it,
    # and only another reward is a change a resume cannot make
    record = json.load(open(os.path.join(out, "run.json")))
    record["config"]["reward"] = None
    json.dump(record, open(os.path.join(out, "run.json"), "w"))
    with pytest.raises(PrefError, match=r'^cannot resume .* with reward "bag-of-words": it was trained with reward "repetition"'):
        ppo_run(tmp_path, tiny_model_dir, reward="bag-of-words", resume=out, objective_options={"ppo_epochs": 2, "beta": 0.1})
    # resuming from step 2 restores the value head and the KL coefficient and finishes the run
    _, resumed = ppo_run(tmp_path, tiny_model_dir, reward=None, resume=out, objective_options={"ppo_epochs": 2, "beta": 0.1})
    assert resumed[-1]["step"] == 4
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["config"]["reward"] is None and record["resumes"] == [{"step": 2, "changed": {"save_every": [2, 0]}}]  # not the reward


def test_ppo_with_minibatches_fixed_kl_and_k3(tmp_path, tiny_model_dir):
    _, lines = ppo_run(tmp_path, tiny_model_dir, steps=2, samples_per_prompt=2,
                       objective_options={"ppo_epochs": 1, "minibatches": 2, "target_kl": "none", "kl_estimator": "k3"})
    assert [m["objective/kl_coef"] for m in lines] == [0.05, 0.05]
    assert lines[0]["reward/mean"] == lines[1]["reward/mean"]  # two mini-batches of one rollout
    assert all(m["objective/kl"] >= 0.0 for m in lines)  # k3 is never negative
