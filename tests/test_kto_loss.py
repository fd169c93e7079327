"""KTO's loss: parity with TRL 1.16's `KTOTrainer._compute_loss`, and by hand."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from pref.errors import PrefError
from pref.plugins.kto import kto_loss, mismatched_rows


class FakeLM:
    """Returns fixed per-token log-probs for the rows it is given: one table for the batch, one for the KL rows."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}

    def __init__(self, tables):
        self.tables = tables  # list of (input_ids, log_probs in TRL's alignment)

    def __call__(self, input_ids, **kwargs):
        for ids, log_probs in self.tables:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                zeros = torch.zeros_like(log_probs)
                return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)
        raise AssertionError("unexpected rows")


def random_rows(n=6, width=9, seed=0):
    """Completion mask [n, width] (prompt of 1-3 tokens, then 1+ completion tokens) and per-token log-probs on it."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, width, dtype=torch.long)
    for row in range(n):
        prompt = int(torch.randint(1, 4, (1,), generator=generator))
        completion = int(torch.randint(1, width - prompt + 1, (1,), generator=generator))
        mask[row, prompt : prompt + completion] = 1
    return mask, -3 * torch.rand(n, width, generator=generator) * mask


def trl_kto(labels, policy_tokens, reference_logps, kl_policy_tokens, kl_reference_logps, mask, kl_mask, **options):
    """TRL's mean loss and metrics; the reference log-probs come precomputed, as TRL caches them."""
    trl = pytest.importorskip("trl")
    trainer = object.__new__(trl.KTOTrainer)
    ids, kl_ids = torch.ones_like(mask), 2 * torch.ones_like(kl_mask)
    model = FakeLM([(ids, policy_tokens[:, 1:]), (kl_ids, kl_policy_tokens[:, 1:])])
    attributes = {
        "model": model,
        "accelerator": SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        "aux_loss_enabled": False,
        "precompute_ref_logps": True,
        "loss_type": "kto",
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        **options,
    }
    attributes["calculate_KL"] = attributes["loss_type"] == "kto"
    for name, value in attributes.items():
        setattr(trainer, name, value)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
        "label": labels, "ref_logps": reference_logps, "ref_KL_logps": kl_reference_logps,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7},
        {"loss_type": "apo_zero_unpaired", "beta": 0.3},
    ],
)
def test_kto_matches_trl(options):
    mask, policy_tokens = random_rows(seed=1)
    kl_mask, kl_policy_tokens = random_rows(seed=2)
    generator = torch.Generator().manual_seed(3)
    reference_logps = -10 * torch.rand(6, generator=generator)
    kl_reference_logps = -30 * torch.rand(6, generator=generator)  # low: a positive KL point
    labels = torch.tensor([True, False, True, True, False, False])

    policy_logps, kl_policy_logps = policy_tokens.sum(-1), kl_policy_tokens.sum(-1)
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        policy_logps[labels], policy_logps[~labels], reference_logps[labels], reference_logps[~labels],
        kl_policy_logps, kl_reference_logps, **options,
    )
    trl_loss, metrics = trl_kto(labels, policy_tokens, reference_logps, kl_policy_tokens, kl_reference_logps, mask, kl_mask, **options)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert kl.item() == pytest.approx(metrics["kl"], abs=1e-5)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    if options.get("loss_type", "kto") == "kto":
        assert kl.item() > 0  # the case worth checking: the reference point moves the losses


def test_kl_point_is_clamped_at_zero_and_detached():
    """Mismatched rows the policy finds less likely than the reference: mean log-ratio < 0, so z = 0."""
    policy_kl = torch.tensor([-5.0, -6.0], requires_grad=True)
    _, _, _, kl = kto_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), policy_kl, torch.tensor([-1.0, -1.0]))
    assert kl.item() == 0.0 and not kl.requires_grad


def test_kto_by_hand():
    """beta 1; desirable log-ratios [1, 0], undesirable [-1]; KL rows: policy [-1, -2], reference [-2, -4] -> z = mean(1, 2) = 1.5.

    desirable: 1 - s(1 - 1.5) = 1 - s(-0.5) = 0.62246;  1 - s(0 - 1.5) = 1 - s(-1.5) = 0.81757
    undesirable: 1 - s(1.5 - (-1)) = 1 - s(2.5) = 0.07586, times undesirable_weight 2 -> 0.15171
    """
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        torch.tensor([-1.0, -3.0]), torch.tensor([-4.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-3.0]),
        torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -4.0]), beta=1.0, undesirable_weight=2.0,
    )
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert kl.item() == pytest.approx(1.5)
    assert_close(losses, torch.tensor([1 - s(-0.5), 1 - s(-1.5), 2 * (1 - s(2.5))]))
    assert_close(losses, torch.tensor([0.62246, 0.81757, 0.15171]), atol=1e-5, rtol=0)
    assert_close(chosen_rewards, torch.tensor([1.0, 0.0]))
    assert_close(rejected_rewards, torch.tensor([-1.0]))


def test_apo_zero_unpaired_by_hand():
    """beta 1: desirable 1 - s(1) = 0.26894; undesirable s(-1) = 0.26894; no KL rows needed."""
    losses, _, _, kl = kto_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), beta=1.0, loss_type="apo_zero_unpaired")
    assert_close(losses, torch.tensor([0.26894, 0.26894]), atol=1e-5, rtol=0)
    assert kl.item() == 0.0


def test_mismatched_rows_rotate_by_one():
    """TRL: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})."""
    assert mismatched_rows(3) == [2, 0, 1]
    assert mismatched_rows(1) == [0]


@pytest.mark.parametrize(
    "options,message",
    [({"loss_type": "kto_pair"}, "unknown KTO loss_type"), ({"beta": 0.0}, "beta must be positive"), ({"desirable_weight": -1.0}, "desirable_weight")],
)
def test_bad_options(options, message):
    with pytest.raises(PrefError, match=message):
        kto_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), **options)


def test_kto_without_kl_rows_says_so():
    with pytest.raises(PrefError, match="mismatched rows"):
        kto_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))


class PromptScaledLM:
    """log p(answer token) = -rate x token id x the row's first (prompt) token id: a row's score depends on its prompt."""

    def __init__(self, rate: float, zero_first: bool):
        self.rate, self.zero_first = rate, zero_first
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.model = torch.nn.Module()

    def logps(self, sequences, with_logits=False, temperature=1.0):
        from pref.sequences import Logps

        mask = sequences.completion_mask.clone()
        if self.zero_first:
            mask[:, 0] = 0
        tokens = -self.rate * sequences.input_ids.float() * sequences.input_ids[:, :1].float() * mask
        return Logps(tokens, mask, tokens.sum(-1))


def test_kto_objective_matches_trl_with_its_own_mismatched_rows():
    """The objective builds the KL rows itself (prompt i with answer i - 1, TRL's rotation) and scores them with both models.

    Log-probs are -rate x id x (the prompt's first id) per answer token: policy rate 0.02, reference 0.05, so the policy
    finds every answer likelier (a positive KL point) and a row's KL log-prob depends on which answer it was given.
    TRL's KL rows are written down from that: row i scores answer i - 1 (row 0: the last answer) under prompt i.
    """
    from pref.interfaces import LabeledBatch
    from pref.plugins.kto import KTO
    from pref.sequences import Sequences

    ids = torch.tensor([[1, 2, 3, 4, 0], [3, 5, 6, 0, 0], [2, 9, 0, 0, 0], [4, 2, 7, 8, 3]])
    attention = (ids > 0).long()
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    labels = torch.tensor([True, False, True, False])
    policy, reference = PromptScaledLM(0.02, zero_first=True), PromptScaledLM(0.05, zero_first=False)
    loss, metrics = KTO(beta=0.5).loss(policy, reference, LabeledBatch(Sequences(ids, attention, completion), labels))

    answers = (ids * completion).sum(-1).float()  # summed ids of each answer: [7, 11, 9, 11]
    prompts = ids[:, 0].float()  # [1, 3, 2, 4]
    rotated = torch.cat([answers[-1:], answers[:-1]])
    # TRL's per-token inputs: each row's summed log-prob on one completion position
    mask = torch.zeros(4, 3, dtype=torch.long)
    mask[:, 1] = 1
    policy_tokens, kl_tokens = torch.zeros(4, 3), torch.zeros(4, 3)
    policy_tokens[:, 1] = -0.02 * prompts * answers
    kl_tokens[:, 1] = -0.02 * prompts * rotated
    trl_loss, trl_metrics = trl_kto(labels, policy_tokens, -0.05 * prompts * answers, kl_tokens, -0.05 * prompts * rotated, mask, mask, beta=0.5)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-6), name
    # 0.03 x mean(prompt i x answer i - 1) = 0.03 x (1 x 11 + 3 x 7 + 2 x 11 + 4 x 9) / 4 = 0.03 x 22.5
    assert metrics["kl"] == pytest.approx(0.675, abs=1e-5)


class TwoProcesses:
    """This process of two: the other one's value of every `mean` is `other` (what TRL's gather brings in)."""

    rank, world = 0, 2

    def __init__(self, other: float):
        self.other = other

    def mean(self, values):
        return (values + self.other) / 2


def test_kl_point_is_averaged_over_processes_before_the_clamp():
    """TRL gathers each process's mean KL log-ratio and clamps their mean (kto_trainer.py:1443-1444): one z for the step.

    This process's KL rows: policy [-3, -3], reference [-2, -2] -> mean -1 (alone: clamped to 0); the other's: 3 -> z = (-1 + 3) / 2 = 1.
    beta 1, desirable log-ratio 0: 1 - s(0 - 1) = 0.73106; undesirable -1: 1 - s(1 + 1) = 0.11920.
    """
    from pref.interfaces import Processes

    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -2.0]))
    losses, _, _, kl = kto_loss(*args, beta=1.0, processes=TwoProcesses(3.0))
    assert kl.item() == pytest.approx(1.0)
    assert_close(losses, torch.tensor([0.73106, 0.11920]), atol=1e-5, rtol=0)
    assert kto_loss(*args, beta=1.0, processes=Processes())[3].item() == 0.0  # one process: its own mean, clamped


def test_kto_objective_averages_its_kl_point_over_processes():
    """The objective hands the run's processes to the loss: the other process's 0.325 and this one's 0.675 give z = 0.5."""
    from pref.interfaces import LabeledBatch
    from pref.plugins.kto import KTO
    from pref.sequences import Sequences

    ids = torch.tensor([[1, 2, 3, 4, 0], [3, 5, 6, 0, 0], [2, 9, 0, 0, 0], [4, 2, 7, 8, 3]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    batch = LabeledBatch(Sequences(ids, (ids > 0).long(), completion), torch.tensor([True, False, True, False]))
    policy, reference = PromptScaledLM(0.02, zero_first=True), PromptScaledLM(0.05, zero_first=False)
    _, metrics = KTO(beta=0.5, processes=TwoProcesses(0.325)).loss(policy, reference, batch)
    assert metrics["kl"] == pytest.approx(0.5, abs=1e-5)
