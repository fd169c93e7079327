"""GRPO and RLOO: advantages and losses against TRL 1.16's GRPOTrainer/RLOOTrainer, and by hand."""

import dataclasses
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from pref.errors import PrefError
from pref.plugins.grpo import GRPO, LOSS_TYPES, check_options, group_advantages, grpo_loss, loss_metrics, vespo_weights
from pref.plugins.rloo import kl_penalised_rewards, leave_one_out_advantages, rloo_loss


def rollout(n=8, width=6, seed=0):
    """Completion mask [n, width] (1+ tokens, then padding), policy/old/reference per-token log-probs, advantages."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=generator)
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    old = -2 * torch.rand(n, width, generator=generator) * mask
    # the policy has moved: ratios between about e^-0.4 and e^0.4, so some tokens are clipped
    policy = old + 0.8 * (torch.rand(n, width, generator=generator) - 0.5) * mask
    reference = old + 0.5 * (torch.rand(n, width, generator=generator) - 0.5) * mask
    advantages = torch.randn(n, generator=generator)
    return mask, policy, old, reference, advantages


def trl_grpo(mask, policy, old, reference, advantages, num_items_in_batch=None, trainer_class=None, **options):
    trl = pytest.importorskip("trl")
    trainer = object.__new__(trainer_class or trl.GRPOTrainer)
    epsilon = options.pop("epsilon", 0.2)
    epsilon_high = options.pop("epsilon_high", None)
    entropies = options.pop("entropies", torch.zeros_like(policy))
    args = SimpleNamespace(
        use_bias_correction_kl=options.pop("use_bias_correction_kl", True), delta=options.pop("delta", None), sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, steps_per_generation=1,
    )
    attributes = {
        "model": SimpleNamespace(training=True),
        "accelerator": SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t,
                                       pad_across_processes=lambda t, dim, pad_index: t, sync_gradients=True),
        "args": args,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "importance_sampling_level": "token",
        "beta": 0.0,
        "loss_type": "dapo",
        "epsilon_low": epsilon,
        "epsilon_high": epsilon if epsilon_high is None else epsilon_high,
        "use_vllm": False,
        "current_gradient_accumulation_steps": 1,
        "max_completion_length": mask.shape[1],
        "_entropy_bonus_enabled": False,
        "aux_loss_enabled": False,
        "_get_per_token_logps_and_entropies": lambda *a, **k: (policy, entropies, None),
        **options,
    }
    for name, value in attributes.items():
        setattr(trainer, name, value)
    inputs = {
        "prompt_ids": torch.ones(len(mask), 1, dtype=torch.long), "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
        "completion_ids": torch.ones_like(mask), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": reference,
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items_in_batch is None else num_items_in_batch)),
    }
    loss = trainer._compute_loss(None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


GRPO_VARIANTS = [{"loss_type": t} for t in LOSS_TYPES if t != "gmpo"] + [  # gmpo: TRL's GMPOTrainer, below
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    {"loss_type": "dapo", "epsilon": 0.1, "epsilon_high": 0.28},
    {"loss_type": "cispo", "epsilon_high": 1.1},
    {"loss_type": "dapo", "beta": 0.04},
    {"loss_type": "grpo", "beta": 0.1, "delta": 1.1},
    {"loss_type": "sapo", "beta": 0.02},
    {"loss_type": "dapo", "beta": 0.04, "use_bias_correction_kl": False},
    {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.05},
    {"loss_type": "dapo", "off_policy_mask_threshold": 0.02},
    {"loss_type": "cispo", "epsilon_high": 1.1, "beta": 0.02, "off_policy_mask_threshold": 0.0},
    {"loss_type": "vespo", "off_policy_mask_threshold": 0.05},
]


@pytest.mark.parametrize("options", GRPO_VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_grpo_loss_matches_trl(options):
    mask, policy, old, reference, advantages = rollout(seed=1)
    policy = policy.clone().requires_grad_(True)
    loss, stats = grpo_loss(policy, old, advantages, mask, reference_token_logps=reference, max_completion_length=mask.shape[1], **options)
    trl_loss, trl_metrics = trl_grpo(mask, policy, old, reference, advantages, **dict(options))
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    metrics = loss_metrics(stats, mask)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert set(trl_metrics) - {"entropy"} == set(metrics)
    # the gradient flows the same way
    (theirs,) = torch.autograd.grad(trl_loss, policy)
    (ours,) = torch.autograd.grad(grpo_loss(policy, old, advantages, mask, reference_token_logps=reference, max_completion_length=mask.shape[1], **options)[0], policy)
    assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [{"epsilon": 0.4}, {"epsilon": 0.2, "epsilon_high": 0.3}, {"epsilon": 0.4, "beta": 0.05}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gmpo_loss_matches_trl(options):
    gmpo = pytest.importorskip("trl.experimental.gmpo")
    mask, policy, old, reference, advantages = rollout(seed=3, width=8)
    old = old + 0.6 * (torch.rand(old.shape, generator=torch.Generator().manual_seed(4)) - 0.5) * mask  # log ratios past +-0.2
    policy = policy.clone().requires_grad_(True)
    loss, stats = grpo_loss(policy, old, advantages, mask, reference_token_logps=reference, loss_type="gmpo", **options)
    trl_loss, trl_metrics = trl_grpo(mask, policy, old, reference, advantages, trainer_class=gmpo.GMPOTrainer, **dict(options))
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-6)
    metrics = loss_metrics(stats, mask)
    assert set(trl_metrics) - {"entropy"} == set(metrics)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-6), name
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # some tokens clipped, some not
    (theirs,) = torch.autograd.grad(trl_loss, policy)
    (ours,) = torch.autograd.grad(grpo_loss(policy, old, advantages, mask, reference_token_logps=reference, loss_type="gmpo", **options)[0], policy)
    assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_gmpo_by_hand():
    """One sample, advantage 1, log ratios 0.1 and 0.5 clipped to 0.4: weight e^((0.1 + 0.4) / 2) = e^0.25, loss -e^0.25.

    With advantage -1 the upper side is not clipped: weight e^0.3, loss e^0.3.
    """
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    policy = torch.tensor([[0.1, 0.5]])
    loss, _ = grpo_loss(policy, old, torch.tensor([1.0]), mask, loss_type="gmpo", epsilon=0.4)
    assert loss.item() == pytest.approx(-math.exp(0.25), abs=1e-6)
    loss, _ = grpo_loss(policy, old, torch.tensor([-1.0]), mask, loss_type="gmpo", epsilon=0.4)
    assert loss.item() == pytest.approx(math.exp(0.3), abs=1e-6)
    with pytest.raises(PrefError, match="^grpo: loss_type gmpo takes the geometric mean of the token ratios itself: use importance_sampling_level token$"):
        check_options("gmpo", "sequence")


def test_dapo_normalises_by_the_whole_rollout_tokens():
    """TRL's dapo divides by the completion tokens of the whole generation batch, not of the micro-batch."""
    mask, policy, old, reference, advantages = rollout(seed=2)
    loss, _ = grpo_loss(policy, old, advantages, mask, total_tokens=100)
    trl_loss, _ = trl_grpo(mask, policy, old, reference, advantages, num_items_in_batch=100)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)


def trl_advantages_group(rewards, k, scale_rewards):
    """TRL 1.16's GRPO advantage lines (`_generate_and_score_completions`, sum_then_normalize); NaN: every reward function gave None."""
    from trl.trainer.utils import nanstd

    mean_grouped = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std_rewards, torch.zeros_like(std_rewards))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_group_advantages_match_trl(scale_rewards, k):
    pytest.importorskip("trl")
    generator = torch.Generator().manual_seed(k)
    rewards = torch.randint(0, 3, (4 * k,), generator=generator).float()  # ties, so some groups have std 0
    ours, ours_zero = group_advantages(rewards, k, scale_rewards)
    theirs, theirs_zero = trl_advantages_group(rewards, k, scale_rewards)
    assert_close(ours, theirs)
    assert torch.equal(ours_zero, theirs_zero)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_leave_unscored_samples_out_as_trl(scale_rewards):
    pytest.importorskip("trl")
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0, float("nan"), float("nan"), 2.0, 2.0, 5.0, float("nan"), 1.0, 4.0])
    ours, ours_zero = group_advantages(rewards, 3, scale_rewards)
    theirs, theirs_zero = trl_advantages_group(rewards, 3, scale_rewards)
    assert_close(ours, theirs)
    assert torch.equal(ours_zero, theirs_zero)
    assert ours[[1, 4, 5, 9]].tolist() == [0.0] * 4 and not ours.isnan().any()


def test_group_advantages_of_unscored_samples_by_hand():
    """Group [1, None, 3]: mean 2 of the two scored, sample std sqrt(2): [-1, 0, 1] / (1.41421 + 1e-4); group [4, None, None]:
    one scored, std NaN, advantage 0 (4 - 4 over NaN); with "none": [-1, 0, 1, 0, 0, 0]."""
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 3.0, 4.0, nan, nan])
    advantages, zero = group_advantages(rewards, 3, "group")
    a = 1 / (math.sqrt(2) + 1e-4)
    assert advantages.tolist() == pytest.approx([-a, 0.0, a, 0.0, 0.0, 0.0], abs=1e-6)
    assert zero.tolist() == [False] * 6  # an unknown std is not a zero one (TRL's isclose of NaN)
    assert group_advantages(rewards, 3, "none")[0].tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_group_advantages_by_hand():
    """Groups [1, 2, 3] and [5, 5, 5]: means 2 and 5, sample stds 1 and 0.

    group: [-1, 0, 1] / 1.0001 and [0, 0, 0]; none: [-1, 0, 1, 0, 0, 0];
    batch: [1, 2, 3, 5, 5, 5] has mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 x 2.25 = 15.5,
    sample variance 15.5 / 5 = 3.1, std 1.76068; advantages [-1, 0, 1, 0, 0, 0] / (1.76068 + 1e-4).
    """
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    advantages, zero = group_advantages(rewards, 3, "group")
    assert_close(advantages, torch.tensor([-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0]))
    assert zero.tolist() == [False] * 3 + [True] * 3
    assert_close(group_advantages(rewards, 3, "none")[0], torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    assert_close(group_advantages(rewards, 3, "batch")[0], torch.tensor([-1.0, 0, 1, 0, 0, 0]) / (math.sqrt(3.1) + 1e-4))


def test_grpo_loss_by_hand():
    """One sample, two tokens; policy log-probs = old + [log 1.5, log 0.5]: ratios [1.5, 0.5]; advantage 1; epsilon 0.2.

    Clipped surrogate per token: -min(r A, clip(r) A) = [-min(1.5, 1.2), -min(0.5, 0.8)] = [-1.2, -0.5].
    grpo/bnpo/dapo (one sample): mean -0.85; dr_grpo with max length 4: sum / 4 = -0.425; luspo: sum -1.7.
    high_clipped on token 1 (ratio 1.5 > 1.2, A > 0): clip_ratio/high_mean 0.5.
    """
    old = torch.tensor([[-1.0, -1.0]])
    policy = old + torch.log(torch.tensor([[1.5, 0.5]]))
    mask, advantages = torch.ones(1, 2), torch.tensor([1.0])
    for loss_type, expected in (("grpo", -0.85), ("bnpo", -0.85), ("dapo", -0.85), ("dr_grpo", -0.425), ("luspo", -1.7)):
        loss, stats = grpo_loss(policy, old, advantages, mask, loss_type=loss_type, max_completion_length=4)
        assert loss.item() == pytest.approx(expected, abs=1e-6), loss_type
    assert loss_metrics(stats, mask)["clip_ratio/high_mean"] == pytest.approx(0.5)


def test_grpo_kl_by_hand():
    """beta 0.5, one token, reference - policy = log 2: k3 = 2 - log 2 - 1 = 0.30685; ratio 1, A = 0: loss 0.5 * 0.30685."""
    policy = torch.tensor([[-2.0]])
    loss, stats = grpo_loss(policy, policy, torch.tensor([0.0]), torch.ones(1, 1), reference_token_logps=policy + math.log(2), beta=0.5)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2)), abs=1e-6)
    assert loss_metrics(stats, torch.ones(1, 1))["kl"] == pytest.approx(1 - math.log(2), abs=1e-6)


def test_cispo_and_sapo_by_hand():
    """One token, ratio 2, advantage 1, log-prob -1.

    cispo, epsilon_high 1.5: -min(2, 1.5) * 1 * (-1) = 1.5.
    sapo, positive advantage (temperature 1): -sigmoid(1 * (2 - 1)) * 4 / 1 * 1 = -4 * 0.73106 = -2.92423.
    """
    old, policy = torch.tensor([[-1.0 - math.log(2)]]), torch.tensor([[-1.0]])
    assert grpo_loss(policy, old, torch.tensor([1.0]), torch.ones(1, 1), loss_type="cispo", epsilon_high=1.5)[0].item() == pytest.approx(1.5)
    assert grpo_loss(policy, old, torch.tensor([1.0]), torch.ones(1, 1), loss_type="sapo")[0].item() == pytest.approx(-4 / (1 + math.exp(-1)), abs=1e-6)


def test_vespo_weight_by_hand():
    """w = 1 gives phi = e^lambda * 1 * e^-lambda = 1; w = e^-1 with k 2, lambda 3: e^(3 - 2 - 3 e^-1) = e^-0.10364 = 0.90155."""
    mask = torch.ones(2, 1)
    phi = vespo_weights(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [-1.0]]), mask)
    assert_close(phi, torch.tensor([[1.0], [math.exp(1 - 3 * math.exp(-1))]]))
    assert phi[1].item() == pytest.approx(0.90155, abs=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"loss_type": "ppo"}, "unknown GRPO loss_type"),
        ({"loss_type": "dapo", "importance_sampling_level": "step"}, "importance_sampling_level"),
        ({"loss_type": "dapo", "epsilon": 1.5}, "epsilon must lie"),
        ({"loss_type": "dapo", "beta": -0.1}, "beta"),
    ],
)
def test_grpo_bad_options(options, message):
    with pytest.raises(PrefError, match=message):
        check_options(**options)


# ---------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------


def trl_rloo(policy_logps_tokens, old_logps, advantages, mask, epsilon=0.2, epsilon_high=None):
    trl = pytest.importorskip("trl")
    trainer = object.__new__(trl.RLOOTrainer)
    attributes = {
        "model": SimpleNamespace(training=True),
        "accelerator": SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "epsilon_low": epsilon,
        "epsilon_high": epsilon if epsilon_high is None else epsilon_high,
        "aux_loss_enabled": False,
        "_get_per_token_logps_and_entropies": lambda *a, **k: (policy_logps_tokens, torch.zeros_like(policy_logps_tokens), None),
    }
    for name, value in attributes.items():
        setattr(trainer, name, value)
    inputs = {
        "prompt_ids": torch.ones(len(mask), 1, dtype=torch.long), "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
        "completion_ids": torch.ones_like(mask), "completion_mask": mask, "advantages": advantages, "old_logps": old_logps,
    }
    loss = trainer._compute_loss(None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("epsilon,epsilon_high", [(0.2, None), (0.1, 0.3)])
def test_rloo_loss_matches_trl(epsilon, epsilon_high):
    mask, policy, old, _, advantages = rollout(seed=3)
    policy_logps, old_logps = (policy * mask).sum(-1), (old * mask).sum(-1)
    loss, stats = rloo_loss(policy_logps, old_logps, advantages, epsilon, epsilon_high)
    trl_loss, metrics = trl_rloo(policy, old_logps, advantages, mask, epsilon, epsilon_high)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert stats["low_clipped"].float().mean().item() == pytest.approx(metrics["clip_ratio/low_mean"])
    assert stats["high_clipped"].float().mean().item() == pytest.approx(metrics["clip_ratio/high_mean"])
    assert metrics["clip_ratio/region_mean"] > 0  # the case worth checking: some samples are clipped


def trl_rloo_advantages(rewards, k, normalize):
    """TRL 1.16's RLOO advantage lines (`_generate_and_score_completions`); NaN: every reward function gave None."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_leave_one_out_advantages_match_trl(k, normalize):
    pytest.importorskip("trl")
    rewards = torch.randn(3 * k, generator=torch.Generator().manual_seed(k))
    assert_close(leave_one_out_advantages(rewards, k, normalize), trl_rloo_advantages(rewards, k, normalize))


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_advantages_leave_unscored_samples_out_as_trl(normalize):
    pytest.importorskip("trl")
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 3.0, 0.5, 2.0, nan, nan, nan, 4.0, -1.0, 2.0, 6.0])
    ours = leave_one_out_advantages(rewards, 4, normalize)
    assert_close(ours, trl_rloo_advantages(rewards, 4, normalize))
    assert not ours.isnan().any() and ours[[1, 5, 6, 7]].tolist() == [0.0] * 4


def test_leave_one_out_by_hand():
    """Group [1, 2, 6]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5 -> advantages [-3, -1.5, 4.5].
    Group [1, None, 6, 2]: the unscored one is out of the baselines, (6 + 2) / 2 = 4, (1 + 2) / 2 = 1.5, (1 + 6) / 2 = 3.5
    -> [-3, 0, 4.5, -1.5]; group [5, None]: its only scored sample has no baseline -> [0, 0]."""
    assert_close(leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))
    nan = float("nan")
    assert leave_one_out_advantages(torch.tensor([1.0, nan, 6.0, 2.0]), 4).tolist() == [-3.0, 0.0, 4.5, -1.5]
    assert leave_one_out_advantages(torch.tensor([5.0, nan]), 2).tolist() == [0.0, 0.0]
    with pytest.raises(PrefError, match="at least 2 samples"):
        leave_one_out_advantages(torch.tensor([1.0]), 1)


def test_kl_penalty_by_hand():
    """Token log-ratios old - reference [0.5, 0.25] (second row: one token 1.0); beta 0.1: rewards [1, 1] - 0.1 [0.75, 1]."""
    old = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    reference = torch.tensor([[-1.5, -1.25], [-3.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards, per_token = kl_penalised_rewards(torch.ones(2), old, reference, mask, 0.1)
    assert_close(rewards, torch.tensor([0.925, 0.9]))
    assert per_token[1, 1].item() == 0.0  # padding carries no KL


def test_rloo_loss_by_hand():
    """Ratios [1.5, 0.5], advantages [1, -1], epsilon 0.2: -min(1.5, 1.2) = -1.2; -min(-0.5, -0.8) = 0.8; mean -0.2."""
    loss, stats = rloo_loss(torch.log(torch.tensor([1.5, 0.5])), torch.zeros(2), torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["high_clipped"].tolist() == [True, False] and stats["low_clipped"].tolist() == [False, True]


# ---------------------------------------------------------------------------
# The objectives on a fake policy: advantages, masks and normalisers end to end.
# ---------------------------------------------------------------------------


def scored_batch(k=3, prompts=2, width=6, seed=5):
    from pref.interfaces import ScoredBatch
    from pref.sequences import Sequences

    generator = torch.Generator().manual_seed(seed)
    n = k * prompts
    completion_mask = torch.zeros(n, width, dtype=torch.long)
    for row in range(n):
        completion_mask[row, 1 : 1 + int(torch.randint(1, width, (1,), generator=generator))] = 1
    ones = torch.ones_like(completion_mask)
    rewards = torch.randint(0, 3, (n,), generator=generator).float()
    tokens = -2 * torch.rand(n, width, generator=generator)
    batch = ScoredBatch(["p"] * n, ["c"] * n, Sequences(ones, ones, completion_mask), {"reward": rewards}, k)
    return batch, tokens, completion_mask, rewards


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_objective_matches_trl(loss_type):
    from test_dpo_loss import TablePolicy

    from pref.interfaces import Minibatch, Rollout
    from pref.plugins.grpo import GRPO

    batch, tokens, completion_mask, rewards = scored_batch()
    policy = TablePolicy(tokens)
    loss, metrics = GRPO(loss_type=loss_type, max_completion_length=6).loss(policy, None, Minibatch(Rollout(batch), torch.arange(len(batch))))

    mask = completion_mask.clone()
    mask[:, 0] = 0  # TablePolicy scores completion tokens after the first position
    advantages, _ = trl_advantages_group(rewards, 3, "group")
    trl_loss, trl_metrics = trl_grpo(mask, tokens * mask, (tokens * mask).detach(), None, advantages, loss_type=loss_type)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert metrics["reward"] == pytest.approx(rewards.mean().item())
    assert metrics["completions/mean_length"] == pytest.approx(mask.sum(-1).float().mean().item())


def test_rloo_objective_matches_trl():
    from test_dpo_loss import TablePolicy

    from pref.interfaces import Minibatch, Rollout
    from pref.plugins.rloo import RLOO

    batch, tokens, completion_mask, rewards = scored_batch(seed=6)
    loss, metrics = RLOO(beta=0.0).loss(TablePolicy(tokens), None, Minibatch(Rollout(batch), torch.arange(len(batch))))
    mask = completion_mask.clone()
    mask[:, 0] = 0
    policy_tokens = tokens * mask
    trl_loss, _ = trl_rloo(policy_tokens, policy_tokens.sum(-1), trl_rloo_advantages(rewards, 3, False), mask)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert metrics["reward_std"] == pytest.approx(rewards.std().item())


class RowPolicy:
    """Fixed per-token log-probs per row of a rollout, found by the row's number in its first input id (any subset of rows)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def logps(self, sequences, with_logits=False, with_entropy=False, temperature=1.0):
        from pref.sequences import Logps

        mask = sequences.completion_mask.clone()
        mask[:, 0] = 0
        tokens = self.tokens[sequences.input_ids[:, 0] - 1] * mask
        return Logps(tokens, mask, tokens.sum(-1))


def test_dr_grpo_divides_by_the_sampling_limit_so_mini_batches_add_up_to_the_batch():
    """TRL's dr_grpo divides by rows x max_completion_length, its sampling limit (grpo_trainer.py:3164): a constant, so two
    halves of a batch, each divided by 2 (--grad-accum 2), give the whole batch's loss. Each half's own longest completion would not."""
    from pref.interfaces import Minibatch, Rollout, ScoredBatch
    from pref.plugins.grpo import GRPO
    from pref.sequences import Sequences

    batch, tokens, completion_mask, rewards = scored_batch(k=2, prompts=2, width=6, seed=6)
    ids = torch.arange(1, len(batch) + 1).unsqueeze(1).expand_as(completion_mask).contiguous()  # row i's ids: i + 1
    batch = ScoredBatch(batch.prompts, batch.completions, Sequences(ids, torch.ones_like(ids), completion_mask), batch.scores, 2, max_new_tokens=8)
    policy, objective = RowPolicy(tokens), GRPO(loss_type="dr_grpo")
    lengths = (completion_mask[:, 1:].sum(-1)).tolist()
    assert max(lengths[:2]) != max(lengths[2:])  # the halves' longest completions differ: the case that tells
    whole = objective.loss(policy, None, Minibatch(Rollout(batch), torch.arange(4)))[0]
    halves = [objective.loss(policy, None, Minibatch(Rollout(batch.select(rows)), torch.arange(2)))[0] for rows in ([0, 1], [2, 3])]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), abs=1e-6)
    mask = completion_mask.clone()
    mask[:, 0] = 0
    advantages, _ = trl_advantages_group(rewards, 2, "group")
    trl_loss, _ = trl_grpo(mask, tokens * mask, (tokens * mask).detach(), None, advantages, loss_type="dr_grpo", max_completion_length=8)
    assert whole.item() == pytest.approx(trl_loss.item(), abs=1e-6)


# ---------------------------------------------------------------------------
# mask_truncated_completions: the completions the sampling limit cut (no EOS) leave the loss, as in TRL.
# ---------------------------------------------------------------------------


def truncation_batch():
    """Two prompts x 2 samples; rows 1 and 3 were cut by the sampling limit (no EOS)."""
    from pref.interfaces import ScoredBatch
    from pref.sequences import Sequences

    ids = torch.tensor([[5, 1, 2, 9, 0], [5, 1, 2, 3, 4], [5, 3, 9, 0, 0], [5, 4, 4, 4, 4]])
    completion_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    attention_mask = completion_mask.clone()
    attention_mask[:, 0] = 1
    rewards, truncated = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([False, True, False, True])
    tokens = -torch.linspace(0.1, 2.0, 20).reshape(4, 5)
    sequences = Sequences(ids, attention_mask, completion_mask)
    return ScoredBatch(["p", "p", "q", "q"], ["a"] * 4, sequences, {"reward": rewards}, 2, truncated=truncated), tokens


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_mask_truncated_completions_leaves_the_cut_answers_out_of_the_loss_as_trl(name):
    from test_dpo_loss import TablePolicy

    from pref.interfaces import Minibatch, Rollout
    from pref.plugins.grpo import GRPO
    from pref.plugins.rloo import RLOO

    batch, tokens = truncation_batch()
    make = (lambda **o: GRPO(**o)) if name == "grpo" else (lambda **o: RLOO(beta=0.0, **o))

    def loss_and_gradient(objective, table, batch=batch):
        table = table.clone().requires_grad_(True)
        loss, metrics = objective.loss(TablePolicy(table), None, Minibatch(Rollout(batch), torch.arange(4)))
        loss.backward()
        return loss, table.grad, metrics

    loss, gradient, metrics = loss_and_gradient(make(mask_truncated_completions=True), tokens)
    kept = batch.sequences.completion_mask.clone()
    kept[:, 0] = 0
    lengths = kept.sum(-1).float()
    kept[[1, 3]] = 0  # TRL zeroes the cut rows' completion mask; their rewards still make the baselines
    rewards, theirs = batch.scores["reward"], tokens.clone().requires_grad_(True)
    if name == "grpo":
        advantages, _ = trl_advantages_group(rewards, 2, "group")
        expected, _ = trl_grpo(kept, theirs * kept, (tokens * kept).detach(), None, advantages, loss_type="dapo")
    else:
        expected, _ = trl_rloo(theirs * kept, (tokens * kept).sum(-1), trl_rloo_advantages(rewards, 2, False), kept)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert_close(gradient, theirs.grad)
    assert gradient[[1, 3]].abs().sum() == 0 and gradient[[0, 2]].abs().sum() > 0
    assert metrics["completions/clipped_ratio"] == 0.5  # TRL's figure, with or without the option
    assert metrics["completions/mean_length"] == pytest.approx(lengths.mean().item())  # the lengths as sampled
    ended = lengths[[0, 2]]  # TRL's terminated lengths: of the answers the limit did not cut
    assert (metrics["completions/mean_terminated_length"], metrics["completions/min_terminated_length"],
            metrics["completions/max_terminated_length"]) == pytest.approx((ended.mean().item(), ended.min().item(), ended.max().item()))
    _, gradient, metrics = loss_and_gradient(make(), tokens)
    assert gradient[[1, 3]].abs().sum() > 0 and metrics["completions/clipped_ratio"] == 0.5
    unknown = dataclasses.replace(batch, truncated=None)
    with pytest.raises(PrefError, match="mask_truncated_completions needs to know which completions the sampling limit cut"):
        loss_and_gradient(make(mask_truncated_completions=True), tokens, unknown)
    assert "completions/clipped_ratio" not in loss_and_gradient(make(), tokens, unknown)[2]


# ---------------------------------------------------------------------------
# top_entropy_quantile: the policy term on the high-entropy "forking" tokens only, as TRL.
# ---------------------------------------------------------------------------


def test_high_entropy_mask_by_hand():
    """Completion entropies 0.1, 0.5, 0.9, 0.3, 0.7 (the last column is padding); the top 40%: the 0.6 quantile is
    0.5 + 0.4 * (0.7 - 0.5) = 0.58, so the tokens of entropy 0.9 and 0.7 stay."""
    from pref.plugins.grpo import high_entropy_mask

    entropy = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert high_entropy_mask(entropy, mask, 0.4).tolist() == [[False, False, True], [False, True, False]]
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.2).any()


@pytest.mark.parametrize("options", [{"loss_type": "dapo"}, {"loss_type": "grpo", "beta": 0.04}, {"loss_type": "dr_grpo"}])
def test_top_entropy_quantile_matches_trl(options):
    from pref.plugins.grpo import high_entropy_mask

    mask, policy, old, reference, advantages = rollout(seed=3)
    entropies = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) * 3 * mask
    ours, stats = grpo_loss(policy, old, advantages, mask, reference_token_logps=reference, max_completion_length=mask.shape[1],
                            token_weights=high_entropy_mask(entropies, mask, 0.2).float(), **options)
    theirs, metrics = trl_grpo(mask, policy, old, reference, advantages, top_entropy_quantile=0.2, entropies=entropies, **options)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-6)
    everything, _ = grpo_loss(policy, old, advantages, mask, reference_token_logps=reference, max_completion_length=mask.shape[1], **options)
    assert everything.item() != pytest.approx(ours.item(), abs=1e-4)
    assert metrics["entropy"] == pytest.approx(((entropies * mask).sum() / mask.sum()).item())


def test_top_entropy_quantile_trains_from_the_cli_and_logs_the_entropy(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from pref.cli.main import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--model", tiny_model_dir, "--reward", "noun-diversity", "-k", "4",
                                      "--steps", "2", "--batch-size", "2", "--max-new-tokens", "6", "--device", "cpu",
                                      "-o", "top_entropy_quantile=0.2", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["entropy"] > 0 for line in lines)
    bad = CliRunner().invoke(cli, ["run", "--objective", "grpo", "-o", "top_entropy_quantile=0", "--output-dir", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and bad.stderr.strip() == "Error: grpo: top_entropy_quantile must lie in (0, 1], got 0"


# ---------------------------------------------------------------------------
# entropy_coef: an entropy bonus on the trained tokens, static or adaptive (Skywork-OR1), as TRL.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_entropy_bonus_matches_trl_loss_and_gradient(quantile):
    from test_dpo_loss import TablePolicy

    from pref.interfaces import Minibatch, Rollout
    from pref.plugins.grpo import GRPO

    batch, tokens, completion_mask, rewards = scored_batch(seed=7)
    entropies = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(8)) * 2

    class WithEntropies(TablePolicy):
        def logps(self, sequences, with_logits=False, with_entropy=False, temperature=1.0):
            out = super().logps(sequences, with_logits)
            out.entropy = self.entropies * out.mask if with_entropy else None
            return out

    ours_entropies = entropies.clone().requires_grad_(True)
    policy = WithEntropies(tokens)
    policy.entropies = ours_entropies
    objective = GRPO(entropy_coef=0.1, top_entropy_quantile=quantile)
    loss, metrics = objective.loss(policy, None, Minibatch(Rollout(batch), torch.arange(len(batch))))
    loss.backward()

    mask = completion_mask.clone()
    mask[:, 0] = 0
    advantages, _ = trl_advantages_group(rewards, 3, "group")
    theirs_entropies = entropies.clone().requires_grad_(True)
    trl_loss, trl_metrics = trl_grpo(mask, tokens * mask, (tokens * mask).detach(), None, advantages, entropies=theirs_entropies * mask,
                                     entropy_coef=0.1, _entropy_bonus_enabled=True, use_adaptive_entropy=False,
                                     top_entropy_quantile=quantile)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert_close(ours_entropies.grad, theirs_entropies.grad)
    assert ours_entropies.grad.abs().sum() > 0
    assert metrics["policy_loss"] == pytest.approx(trl_metrics["policy_loss"], abs=1e-6)
    assert metrics["entropy_coef"] == trl_metrics["entropy_coef"] == 0.1


def test_adaptive_entropy_control_by_hand():
    """target 0.5, coef 0.1, delta 0.05. Step 1: no entropy known yet, no bonus; its entropy 0.4 <= 0.5 raises coef to
    0.15. Step 2: bonus 0.15 x its mean; entropy 0.7 lowers coef to 0.1. Step 3: 0.7 > 0.5, no bonus."""
    from pref.plugins.grpo import EntropyBonus

    bonus = EntropyBonus(0.1, adaptive=True, delta=0.05, target=0.5)
    mask = torch.ones(2, 2)
    assert bonus.term(torch.full((2, 2), 0.4), mask).item() == 0.0
    bonus.after_step()
    assert bonus.coef == pytest.approx(0.15) and bonus.last_entropy == pytest.approx(0.4)
    assert bonus.term(torch.full((2, 2), 0.7), mask).item() == pytest.approx(0.15 * 0.7)
    bonus.after_step()
    assert bonus.coef == pytest.approx(0.1) and bonus.last_entropy == pytest.approx(0.7)
    assert bonus.term(torch.full((2, 2), 0.7), mask).item() == 0.0
    for _ in range(40):  # bounded by entropy_coef_min
        bonus.term(torch.full((2, 2), 0.7), mask)
        bonus.after_step()
    assert bonus.coef == 0.0
    with pytest.raises(PrefError, match="entropy_coef_min .* must not exceed entropy_coef_max"):
        EntropyBonus(minimum=1.0, maximum=0.5)


def test_adaptive_entropy_resumes_with_its_coefficient(tmp_path, tiny_model_dir, interrupted_after):
    from pref.config import build_config
    from pref.registry import load_registry
    from pref.train import train

    def config(out, **flags):
        return build_config(flags={"objective": "grpo", "model": tiny_model_dir, "reward": ["noun-diversity"], "samples_per_prompt": 2,
                                   "steps": 4, "batch_size": 2, "max_new_tokens": 6, "device": "cpu", "output_dir": str(out), "lr": 1e-3,
                                   "objective_options": {"use_adaptive_entropy": True, "entropy_coef": 0.01, "entropy_target": 50.0,
                                                         "entropy_coef_delta": 0.02}, **flags})

    train(config(tmp_path / "whole"), load_registry())
    with interrupted_after(3):
        train(config(tmp_path / "resumed", save_every=2), load_registry())
    train(config(tmp_path / "resumed", save_every=2, resume=str(tmp_path / "resumed")), load_registry())
    figures = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("whole", "resumed")}
    # the target is above any entropy here: the coefficient climbs by 0.02 each step, and goes on from step 2's after the resume
    assert [line["entropy_coef"] for line in figures["whole"]] == pytest.approx([0.01, 0.03, 0.05, 0.07])
    assert [line["entropy_coef"] for line in figures["resumed"]] == pytest.approx([0.01, 0.03, 0.05, 0.07])
    assert figures["resumed"][3]["loss"] == pytest.approx(figures["whole"][3]["loss"], abs=1e-6)


def test_the_off_policy_mask_drops_a_drifted_sample_pushed_down_by_hand():
    """Sample 0 drifted by mean(old - new) = 0.5 > 0.1 with advantage -1: dropped; sample 1 (drift -0.5) stays.
    Sample 1: ratio e^0.5 = 1.6487, past the clip; -min(-1.6487, -1.2) = 1.6487 per token; bnpo: 2 x 1.6487 / 4 tokens."""
    old = torch.full((2, 2), -1.0)
    policy = torch.tensor([[-1.5, -1.5], [-0.5, -0.5]])
    advantages, mask = torch.tensor([-1.0, -1.0]), torch.ones(2, 2)
    masked, _ = grpo_loss(policy, old, advantages, mask, loss_type="bnpo", off_policy_mask_threshold=0.1)
    kept, _ = grpo_loss(policy, old, advantages, mask, loss_type="bnpo")
    assert masked.item() == pytest.approx(2 * math.exp(0.5) / 4, abs=1e-6)
    assert kept.item() == pytest.approx((2 * 0.8 + 2 * math.exp(0.5)) / 4, abs=1e-6)  # sample 0's ratio e^-0.5 clipped up to 0.8
    assert grpo_loss(policy, old, -advantages, mask, loss_type="bnpo", off_policy_mask_threshold=0.1)[0].item() == pytest.approx(
        grpo_loss(policy, old, -advantages, mask, loss_type="bnpo")[0].item())  # a positive advantage is never dropped


def test_the_bias_corrected_kl_gradient_is_the_reverse_kl_one_by_hand():
    """One token on-policy (ratio 1), log p = -1, log ref = -0.5: k3 = e^0.5 - 1.5; d k3 / d log p = 1 - e^0.5 = -0.6487;
    times the ratio, + k3 x d ratio / d log p (= 1): log p - log ref = -0.5, the reverse KL's gradient."""
    policy = torch.tensor([[-1.0]], requires_grad=True)
    for corrected, expected in ((True, -0.5), (False, 1 - math.exp(0.5))):
        loss, stats = grpo_loss(policy, policy.detach(), torch.zeros(1), torch.ones(1, 1), reference_token_logps=torch.tensor([[-0.5]]),
                                beta=1.0, loss_type="bnpo", use_bias_correction_kl=corrected)
        (grad,) = torch.autograd.grad(loss, policy)
        assert loss.item() == pytest.approx(math.exp(0.5) - 1.5) and grad.item() == pytest.approx(expected, abs=1e-6)


def test_off_policy_masking_is_refused_for_gmpo_and_below_zero():
    with pytest.raises(PrefError, match="off_policy_mask_threshold"):
        GRPO(loss_type="gmpo", off_policy_mask_threshold=0.5)
    with pytest.raises(PrefError, match="off_policy_mask_threshold"):
        GRPO(off_policy_mask_threshold=-1.0)


def test_rloo_clips_the_rewards_before_its_baselines_and_logs_them_unclipped_by_hand():
    """Rewards [5, 0, -5, 1] in groups of 2, clipped into [-1, 1]: [1, 0, -1, 1]; leave-one-out advantages [1, -1, -2, 2]."""
    from test_dpo_loss import TablePolicy

    from pref.interfaces import ScoredBatch
    from pref.plugins.rloo import RLOO
    from pref.sequences import Sequences

    ones = torch.ones(4, 3, dtype=torch.long)
    batch = ScoredBatch(["p"] * 4, ["c"] * 4, Sequences(ones, ones, ones), {"reward": torch.tensor([5.0, 0.0, -5.0, 1.0])}, 2)
    prepared = RLOO(beta=0.0, reward_clip_range=[-1, 1]).prepare(TablePolicy(torch.zeros(4, 3)), None, batch)
    assert prepared.advantages.tolist() == [1.0, -1.0, -2.0, 2.0]
    assert prepared.metrics["reward"] == pytest.approx(0.25)  # the scores' mean, unclipped
    unclipped = RLOO(beta=0.0).prepare(TablePolicy(torch.zeros(4, 3)), None, batch)
    assert unclipped.advantages.tolist() == [5.0, -5.0, -6.0, 6.0]
    for bad in ([1, -1], [0], "1,2", [True, 2]):
        with pytest.raises(PrefError, match="reward_clip_range must be"):
            RLOO(reward_clip_range=bad)


def trl_decoupled(parts, weights, k):
    """TRL 1.16's "normalize_then_sum" branch of `_generate_and_score_completions`, step for step."""
    from trl.trainer.utils import nanstd

    grouped = parts.view(-1, k, parts.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, parts.shape[1])
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(parts).all(dim=1)] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std_rewards, torch.zeros_like(std_rewards))


def test_gdpo_advantages_leave_unscored_samples_out_as_trl():
    """Each reward applies to some samples only (a function's None): TRL's multi-task use; the last sample neither scored."""
    pytest.importorskip("trl")
    from pref.plugins.grpo import decoupled_advantages

    nan = float("nan")
    parts = torch.tensor([[1.0, nan], [0.0, nan], [nan, 3.0], [nan, 1.0], [1.0, 2.0], [0.0, 0.5], [1.0, nan], [nan, nan]])
    weights = torch.tensor([1.0, 0.5])
    ours, ours_zero = decoupled_advantages(parts, weights, 2)
    theirs, theirs_zero = trl_decoupled(parts, weights, 2)
    assert_close(ours, theirs)
    assert ours_zero.tolist() == theirs_zero.tolist() and ours[7].item() == 0.0


def test_gdpo_advantages_by_hand_and_as_trl():
    """Two prompts of K = 2, rewards r1 = [1, 0, 1, 1] and r2 = [0, 0, 3, 1] weighted 1 and 0.5. Within each group r1 gives
    +-0.5 / (0.7071 + 1e-4) and [0, 0], r2 [0, 0] and +-1 / (1.4142 + 1e-4); summed: [a, -a, b, -b] with a = 0.70701 and
    b = 0.35353, whose batch std is sqrt((2a^2 + 2b^2) / 3) = 0.64543: advantages [1.0953, -1.0953, 0.5477, -0.5477].
    Summed first (the default), the groups [1, 0] and [2.5, 1.5] would both give +-0.7070: GDPO keeps them apart."""
    from pref.plugins.grpo import decoupled_advantages

    parts, weights = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 3.0], [1.0, 1.0]]), torch.tensor([1.0, 0.5])
    advantages, std_is_zero = decoupled_advantages(parts, weights, 2)
    assert advantages.tolist() == pytest.approx([1.0953, -1.0953, 0.5477, -0.5477], abs=2e-4)
    theirs, their_zero = trl_decoupled(parts, weights, 2)
    assert_close(advantages, theirs)
    assert std_is_zero.tolist() == their_zero.tolist() == [False] * 4
    summed, _ = group_advantages((parts * weights).sum(1), 2)
    assert summed.tolist() == pytest.approx([0.7070, -0.7070, 0.7070, -0.7070], abs=2e-4)
    flat, flat_zero = decoupled_advantages(torch.ones(4, 2), weights, 2)  # every reward equal: nothing to learn
    assert flat.tolist() == [0.0] * 4 and flat_zero.all()


def test_grpo_normalize_then_sum_reads_a_weighted_rewards_parts():
    from pref.interfaces import ScoredBatch
    from pref.plugins.grpo import decoupled_advantages
    from pref.sequences import Sequences

    ones = torch.ones(4, 3, dtype=torch.long)
    r1, r2 = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 3.0, 1.0])
    scores = {"reward": r1 + 0.5 * r2, "a/reward": r1, "b/reward": r2}
    batch = ScoredBatch(["p"] * 4, ["c"] * 4, Sequences(ones, ones, ones), scores, 2, reward_weights={"a": 1.0, "b": 0.5})
    advantages, _ = GRPO(multi_objective_aggregation="normalize_then_sum").advantages(batch, 2)
    assert_close(advantages, decoupled_advantages(torch.stack([r1, r2], 1), torch.tensor([1.0, 0.5]), 2)[0])
    assert_close(GRPO().advantages(batch, 2)[0], group_advantages(scores["reward"], 2)[0])  # the default sums first
    single = ScoredBatch(["p"] * 4, ["c"] * 4, Sequences(ones, ones, ones), {"reward": r2}, 2)  # one reward: weight 1
    assert_close(GRPO(multi_objective_aggregation="normalize_then_sum").advantages(single, 2)[0],
                 decoupled_advantages(r2.unsqueeze(1), torch.ones(1), 2)[0])
    assert batch.select([0, 1]).reward_weights == {"a": 1.0, "b": 0.5}
    with pytest.raises(PrefError, match="multi_objective_aggregation"):
        GRPO(multi_objective_aggregation="sum")
