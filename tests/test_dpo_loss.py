"""The DPO plugin: hand-computed losses, parity with TRL 1.16, the objective, registration."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from pref.errors import PrefError
from pref.interfaces import PairBatch, Policy, Reference
from pref.plugins.dpo import DPO, dpo_loss
from pref.registry import load_registry
from pref.sequences import Logps, Sequences

# ---------------------------------------------------------------------------
# Hand-computed cases.
#
# policy chosen   [-1, -4, -2]   reference chosen   [-2, -3, -2]  -> chosen log-ratios   [ 1, -1, 0]
# policy rejected [-3, -2, -4]   reference rejected [-2, -3, -4]  -> rejected log-ratios [-1,  1, 0]
# With beta = 0.5 the margin beta * (chosen - rejected) is [1, -1, 0].
# -logsigmoid(x) = log(1 + e^-x):  x = 1 -> 0.31326,  x = -1 -> 1.31326,  x = 0 -> log 2 = 0.69315,
# and -logsigmoid(-x) = -logsigmoid(x) + x.
# ---------------------------------------------------------------------------

BETA = 0.5
SOFTPLUS_M1 = math.log1p(math.exp(-1.0))  # -logsigmoid(1) = 0.31326
SOFTPLUS_P1 = math.log1p(math.exp(1.0))  # -logsigmoid(-1) = 1.31326
LOG2 = math.log(2.0)


def hand_logps():
    return (
        torch.tensor([-1.0, -4.0, -2.0]),
        torch.tensor([-3.0, -2.0, -4.0]),
        torch.tensor([-2.0, -3.0, -2.0]),
        torch.tensor([-2.0, -3.0, -4.0]),
    )


def test_sigmoid_by_hand():
    """-logsigmoid([1, -1, 0]) = [0.31326, 1.31326, 0.69315]."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(*hand_logps(), beta=BETA)
    assert_close(losses, torch.tensor([SOFTPLUS_M1, SOFTPLUS_P1, LOG2]))
    assert_close(losses, torch.tensor([0.31326, 1.31326, 0.69315]), atol=1e-5, rtol=0)
    # rewards are beta * log-ratios
    assert_close(chosen_rewards, torch.tensor([0.5, -0.5, 0.0]))
    assert_close(rejected_rewards, torch.tensor([-0.5, 0.5, 0.0]))


def test_conservative_sigmoid_by_hand():
    """cDPO, eps = 0.1: 0.9 * softplus(-m) + 0.1 * softplus(m) = softplus(-m) + 0.1 * m.

    m = [1, -1, 0] -> [0.31326 + 0.1, 1.31326 - 0.1, 0.69315] = [0.41326, 1.21326, 0.69315].
    """
    losses, _, _ = dpo_loss(*hand_logps(), beta=BETA, label_smoothing=0.1)
    assert_close(losses, torch.tensor([SOFTPLUS_M1 + 0.1, SOFTPLUS_P1 - 0.1, LOG2]))


def test_robust_by_hand():
    """rDPO, eps = 0.1: (0.9 * softplus(-m) - 0.1 * softplus(m)) / 0.8.

    m = 1:  (0.9 a - 0.1 (a + 1)) / 0.8 = a - 0.125, a = 0.31326 -> 0.18826
    m = -1: (0.9 a - 0.1 (a - 1)) / 0.8 = a + 0.125, a = 1.31326 -> 1.43826
    m = 0:  0.8 log 2 / 0.8 = 0.69315
    """
    losses, _, _ = dpo_loss(*hand_logps(), beta=BETA, loss_type="robust", label_smoothing=0.1)
    assert_close(losses, torch.tensor([SOFTPLUS_M1 - 0.125, SOFTPLUS_P1 + 0.125, LOG2]))


def test_robust_without_smoothing_is_sigmoid():
    robust, _, _ = dpo_loss(*hand_logps(), beta=BETA, loss_type="robust")
    sigmoid, _, _ = dpo_loss(*hand_logps(), beta=BETA)
    assert_close(robust, sigmoid)


def test_hinge_by_hand():
    """relu(1 - [1, -1, 0]) = [0, 2, 1]."""
    losses, _, _ = dpo_loss(*hand_logps(), beta=BETA, loss_type="hinge")
    assert_close(losses, torch.tensor([0.0, 2.0, 1.0]))


def test_ipo_by_hand():
    """(chosen - rejected log-ratio - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1.

    Without lengths: differences [2, -2, 0] -> [1, 9, 1].
    With chosen lengths [1, 2, 4] and rejected lengths [1, 1, 2] the log-ratios are
    averaged per token: chosen [1, -0.5, 0], rejected [-1, 1, 0] -> differences
    [2, -1.5, 0] -> [1, 6.25, 1].
    """
    losses, _, _ = dpo_loss(*hand_logps(), beta=BETA, loss_type="ipo")
    assert_close(losses, torch.tensor([1.0, 9.0, 1.0]))
    losses, chosen_rewards, _ = dpo_loss(
        *hand_logps(), beta=BETA, loss_type="ipo",
        chosen_lengths=torch.tensor([1, 2, 4]), rejected_lengths=torch.tensor([1, 1, 2]),
    )
    assert_close(losses, torch.tensor([1.0, 6.25, 1.0]))
    # rewards stay on summed log-probs, as in TRL
    assert_close(chosen_rewards, torch.tensor([0.5, -0.5, 0.0]))


def test_reference_free_by_hand():
    """Reference log-probs count as 0: margin 0.5 * ([-1, -4, -2] - [-3, -2, -4]) = [1, -1, 1]."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(*hand_logps(), beta=BETA, reference_free=True)
    assert_close(losses, torch.tensor([SOFTPLUS_M1, SOFTPLUS_P1, SOFTPLUS_M1]))
    assert_close(chosen_rewards, torch.tensor([-0.5, -2.0, -1.0]))
    assert_close(rejected_rewards, torch.tensor([-1.5, -1.0, -2.0]))


def test_losses_carry_grad_and_rewards_do_not():
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = hand_logps()
    policy_chosen.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=BETA
    )
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    # d/dx -logsigmoid(beta x) = -beta * sigmoid(-beta x), at margins [1, -1, 0]
    assert_close(policy_chosen.grad, -BETA * torch.sigmoid(-torch.tensor([1.0, -1.0, 0.0])))


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(PrefError) as info:
        dpo_loss(*hand_logps(), loss_type="kto")
    for name in ("sigmoid", "ipo", "hinge", "robust"):
        assert name in str(info.value)
    with pytest.raises(PrefError):
        DPO(loss_type="sigmod")


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "robust", "label_smoothing": 0.5},
        {"label_smoothing": -0.1},
        {"loss_type": "ipo", "label_smoothing": 0.1},
        {"beta": 0.0},
        {"sft_weight": -1.0},
    ],
)
def test_bad_options_are_user_errors(options):
    with pytest.raises(PrefError):
        DPO(**options)


# ---------------------------------------------------------------------------
# Parity with TRL 1.16.
#
# TRL 1.16 has no stand-alone DPO loss function: `DPOTrainer._compute_loss`
# runs the model (with a fused LM head returning per-token `log_probs`) and
# computes the loss and metrics inline. We call it on a trainer made with
# `object.__new__` that carries only the attributes `_compute_loss` reads, a
# fake model returning known per-token log-probs, and precomputed reference
# log-probs. TRL 1.16's sigmoid loss ignores label smoothing; its conservative
# form (cDPO) lives on in `CPOTrainer.cpo_loss`, which is DPO's sigmoid loss
# with the reference folded into its inputs.
# ---------------------------------------------------------------------------


class FakeLM:
    """Stands in for the fused-LM-head model: returns fixed per-token log-probs."""

    training = True

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo(loss_type, beta, label_smoothing, policy_tokens, reference_chosen, reference_rejected, completion_mask):
    """Run TRL's `DPOTrainer._compute_loss`: returns (mean loss, metrics of the train mode).

    policy_tokens: [2B, T] log p(token t) on completion tokens, chosen rows first (our `Logps.tokens`).
    reference_chosen/reference_rejected: [B] summed reference log-probs.
    completion_mask: [2B, T].
    """
    trl = pytest.importorskip("trl")
    trainer = object.__new__(trl.DPOTrainer)
    attributes = {
        "model": FakeLM(policy_tokens[:, 1:]),  # TRL's log_probs[:, t] scores token t + 1
        "accelerator": SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        "aux_loss_enabled": False,
        "ld_alpha": None,
        "precompute_ref_logps": True,
        "f_divergence_type": "reverse_kl",
        "loss_types": [loss_type],
        "loss_weights": [1.0],
        "beta": beta,
        "label_smoothing": label_smoothing,
        "use_weighting": False,
    }
    for name, value in attributes.items():
        setattr(trainer, name, value)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": reference_chosen,
        "ref_rejected_logps": reference_rejected,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def trl_dpo_per_pair(loss_type, beta, label_smoothing, policy_tokens, reference_chosen, reference_rejected, completion_mask):
    """TRL returns the mean only, so run it once per pair to get [B] losses."""
    n = len(reference_chosen)
    losses = []
    for i in range(n):
        rows = [i, n + i]
        loss, _ = trl_dpo(
            loss_type, beta, label_smoothing, policy_tokens[rows],
            reference_chosen[i : i + 1], reference_rejected[i : i + 1], completion_mask[rows],
        )
        losses.append(loss)
    return torch.stack(losses)


def random_pairs(n=6, width=10, seed=0):
    """Random per-token log-probs over prompts and completions of varied lengths.

    Returns the completion mask [2n, width] (every row has a prompt of 1-3 tokens,
    then 1+ completion tokens, then padding), policy and reference per-token
    log-probs [2n, width] (0 off the completion), chosen rows first.
    """
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for row in range(2 * n):
        prompt = int(torch.randint(1, 4, (1,), generator=generator))
        completion = int(torch.randint(1, width - prompt + 1, (1,), generator=generator))
        completion_mask[row, prompt : prompt + completion] = 1
    policy_tokens = -3 * torch.rand(2 * n, width, generator=generator) * completion_mask
    reference_tokens = -3 * torch.rand(2 * n, width, generator=generator) * completion_mask
    return completion_mask, policy_tokens, reference_tokens


TRL_VARIANTS = [
    ("sigmoid", 0.1, 0.0),
    ("ipo", 0.5, 0.0),
    ("hinge", 0.2, 0.0),
    ("robust", 0.1, 0.2),
]


@pytest.mark.parametrize("loss_type,beta,label_smoothing", TRL_VARIANTS)
def test_losses_match_trl(loss_type, beta, label_smoothing):
    completion_mask, policy_tokens, reference_tokens = random_pairs()
    n = len(completion_mask) // 2
    policy, reference, lengths = policy_tokens.sum(-1), reference_tokens.sum(-1), completion_mask.sum(-1)

    ours, chosen_rewards, rejected_rewards = dpo_loss(
        policy[:n], policy[n:], reference[:n], reference[n:],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
    )
    theirs = trl_dpo_per_pair(loss_type, beta, label_smoothing, policy_tokens, reference[:n], reference[n:], completion_mask)
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    _, metrics = trl_dpo(loss_type, beta, label_smoothing, policy_tokens, reference[:n], reference[n:], completion_mask)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


def test_reference_free_matches_trl_with_zero_reference():
    """TRL 1.16 has no reference-free switch; a reference scoring every completion 0 is the same thing."""
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=1)
    n = len(completion_mask) // 2
    policy, reference = policy_tokens.sum(-1), reference_tokens.sum(-1)
    ours, _, _ = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=0.1, reference_free=True)
    zeros = torch.zeros(n)
    theirs = trl_dpo_per_pair("sigmoid", 0.1, 0.0, policy_tokens, zeros, zeros, completion_mask)
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_conservative_sigmoid_matches_trl():
    """cDPO: TRL's `CPOTrainer.cpo_loss` (sigmoid) given the log-ratios is DPO with label smoothing."""
    pytest.importorskip("trl")
    cpo = pytest.importorskip("trl.experimental.cpo")
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=2)
    n = len(completion_mask) // 2
    policy, reference = policy_tokens.sum(-1), reference_tokens.sum(-1)
    ours, _, _ = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=0.1, label_smoothing=0.2)

    trainer = object.__new__(cpo.CPOTrainer)
    for name, value in {
        "alpha": 0.0, "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.2,
        "accelerator": SimpleNamespace(device=torch.device("cpu")),
    }.items():
        setattr(trainer, name, value)
    theirs, _, _ = trainer.cpo_loss(policy[:n] - reference[:n], policy[n:] - reference[n:])
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# The objective on a tiny fake policy.
# ---------------------------------------------------------------------------


class TablePolicy(Policy):
    """Returns fixed per-token log-probs for whatever it is asked to score; counts the calls."""

    def __init__(self, tokens: torch.Tensor, pad_token_id: int = 0):
        self.model = torch.nn.Module()
        self.tokenizer = SimpleNamespace(pad_token_id=pad_token_id)
        self.tokens = tokens
        self.calls: list[Sequences] = []

    def generate(self, prompts, k, sampling):
        raise NotImplementedError

    def encode(self, prompts, completions, max_prompt_length=None):
        raise NotImplementedError

    def save(self, path):
        raise NotImplementedError

    def logps(self, sequences, with_logits=False, with_entropy=False, temperature=1.0):
        self.calls.append(sequences)
        mask = sequences.completion_mask.clone()
        mask[:, 0] = 0
        tokens = self.tokens * mask
        return Logps(tokens, mask, tokens.sum(-1))


class TableReference(Reference):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self.calls: list[Sequences] = []
        self.grad_enabled: list[bool] = []

    def logps(self, sequences, with_logits=False, with_entropy=False, temperature=1.0):
        self.calls.append(sequences)
        self.grad_enabled.append(torch.is_grad_enabled())
        tokens = self.tokens * sequences.completion_mask
        return Logps(tokens, sequences.completion_mask, tokens.sum(-1))


class IdPolicy(TablePolicy):
    """log p(token) = -0.1 * scale * token id on completion tokens; `scale` is a parameter to get gradients."""

    def __init__(self, pad_token_id: int = 7):
        super().__init__(torch.zeros(0), pad_token_id)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def logps(self, sequences, with_logits=False, with_entropy=False, temperature=1.0):
        self.calls.append(sequences)
        mask = sequences.completion_mask.clone()
        mask[:, 0] = 0
        tokens = -0.1 * self.scale * sequences.input_ids.float() * mask
        return Logps(tokens, mask, tokens.sum(-1))


class IdReference(TableReference):
    """log p(token) = -0.05 * token id on completion tokens."""

    def __init__(self):
        super().__init__(torch.zeros(0))

    def logps(self, sequences, with_logits=False, with_entropy=False, temperature=1.0):
        self.calls.append(sequences)
        self.grad_enabled.append(torch.is_grad_enabled())
        tokens = -0.05 * sequences.input_ids.float() * sequences.completion_mask
        return Logps(tokens, sequences.completion_mask, tokens.sum(-1))


def id_batch() -> PairBatch:
    """Two pairs; the rejected rows are narrower, so concatenation pads them.

    chosen   [1 2 | 3 4]   and [1 | 5 6] + 1 pad   -> completion id sums 7 and 11
    rejected [1 2 | 2]     and [1 | 3 9]           -> completion id sums 2 and 12
    """
    chosen = Sequences(
        torch.tensor([[1, 2, 3, 4], [1, 5, 6, 0]]),
        torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]]),
    )
    rejected = Sequences(
        torch.tensor([[1, 2, 2], [1, 3, 9]]),
        torch.tensor([[1, 1, 1], [1, 1, 1]]),
        torch.tensor([[0, 0, 1], [0, 1, 1]]),
    )
    return PairBatch(chosen, rejected)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_objective_one_forward_pass_and_trl_metrics():
    """Policy logps: chosen [-0.7, -1.1], rejected [-0.2, -1.2]; reference: half of those.

    Log-ratios: chosen [-0.35, -0.55], rejected [-0.1, -0.6].
    beta = 0.1: rewards chosen [-0.035, -0.055], rejected [-0.01, -0.06], margins [-0.025, 0.005].
    Loss: mean(-logsigmoid(margins)) = mean(softplus(0.025), softplus(-0.005)).
    """
    policy, reference = IdPolicy(pad_token_id=7), IdReference()
    loss, metrics = DPO().loss(policy, reference, id_batch())

    assert len(policy.calls) == 1 and len(policy.calls[0]) == 4
    seqs = policy.calls[0]
    assert seqs.input_ids[2:, 3].tolist() == [7, 7]  # rejected rows padded with the tokenizer's pad id
    assert seqs.attention_mask[2:, 3].tolist() == [0, 0]
    assert len(reference.calls) == 1 and reference.calls[0] is seqs
    assert reference.grad_enabled == [False]

    assert loss.item() == pytest.approx((softplus(0.025) + softplus(-0.005)) / 2, abs=1e-6)
    assert set(metrics) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
    }
    assert all(type(value) is float for value in metrics.values())
    expected = {
        "rewards/chosen": -0.045,
        "rewards/rejected": -0.035,
        "rewards/accuracies": 0.5,
        "rewards/margins": -0.01,
        "logps/chosen": -0.9,
        "logps/rejected": -0.7,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name

    loss.backward()
    assert policy.scale.grad is not None


def test_objective_sft_term():
    """Per-token chosen log-probs: row 0 -0.7 / 2 = -0.35, row 1 -1.1 / 2 = -0.55; NLL mean 0.45.

    With sft_weight 0.5 the loss grows by 0.5 * 0.45 = 0.225.
    """
    plain, _ = DPO().loss(IdPolicy(), IdReference(), id_batch())
    loss, metrics = DPO(sft_weight=0.5).loss(IdPolicy(), IdReference(), id_batch())
    assert loss.item() == pytest.approx(plain.item() + 0.225, abs=1e-6)
    assert metrics["nll_loss"] == pytest.approx(0.45, abs=1e-6)  # TRL's name for CPO's and ORPO's NLL term
    assert metrics["loss/dpo"] == pytest.approx(plain.item(), abs=1e-6)


def test_objective_pads_with_zero_when_the_tokenizer_has_no_pad_id():
    policy = IdPolicy(pad_token_id=None)
    DPO().loss(policy, IdReference(), id_batch())
    assert policy.calls[0].input_ids[2:, 3].tolist() == [0, 0]


def test_objective_reference_free():
    objective = DPO(reference_free=True)
    assert objective.needs.reference == "none"
    assert DPO.needs.reference == "logps" and DPO().needs.reference == "logps"
    reference = IdReference()
    _, metrics = objective.loss(IdPolicy(), reference, id_batch())
    assert reference.calls == []
    # rewards are beta * policy logps: chosen [-0.07, -0.11]
    assert metrics["rewards/chosen"] == pytest.approx(-0.09, abs=1e-6)


def test_objective_without_reference_is_reference_free():
    """A run with `reference: none` passes no reference: the reference log-probs count as 0."""
    loss, metrics = DPO().loss(IdPolicy(), None, id_batch())
    free_loss, free_metrics = DPO(reference_free=True).loss(IdPolicy(), IdReference(), id_batch())
    assert loss.item() == pytest.approx(free_loss.item())
    assert metrics == pytest.approx(free_metrics)


@pytest.mark.parametrize("loss_type,beta,label_smoothing", TRL_VARIANTS)
def test_objective_matches_trl(loss_type, beta, label_smoothing):
    """Loss and metrics of the whole objective equal TRL's `_compute_loss` on the same log-probs."""
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=3)
    n = len(completion_mask) // 2
    ones = torch.ones_like(completion_mask)
    batch = PairBatch(
        Sequences(ones[:n], ones[:n], completion_mask[:n]),
        Sequences(ones[n:], ones[n:], completion_mask[n:]),
    )
    objective = DPO(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    loss, metrics = objective.loss(TablePolicy(policy_tokens), TableReference(reference_tokens), batch)

    reference = reference_tokens.sum(-1)
    trl_loss, trl_metrics = trl_dpo(loss_type, beta, label_smoothing, policy_tokens, reference[:n], reference[n:], completion_mask)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name


# ---------------------------------------------------------------------------
# Registration.
# ---------------------------------------------------------------------------


def test_dpo_is_a_builtin_objective():
    registry = load_registry()
    item = registry.get("objective", "dpo")
    assert item.package == "pref" and item.builtin
    assert item.factory is DPO
    assert item.description == DPO.__doc__.splitlines()[0]
    objective = registry.create("objective", "dpo", {"beta": 0.2, "loss_type": "ipo"})
    assert isinstance(objective, DPO) and objective.beta == 0.2 and objective.loss_type == "ipo"
    with pytest.raises(PrefError):
        registry.create("objective", "dpo", {"betta": 0.2})
