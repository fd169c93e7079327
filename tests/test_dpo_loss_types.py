"""Every DPO loss type and option of TRL 1.16: parity with `DPOTrainer._compute_loss`, and by hand.

The inputs are those of tests/test_dpo_loss.py; TRL is run on a trainer built with
`object.__new__` and fed fixed per-token log-probs by a fake model.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from pref.errors import PrefError
from pref.plugins.dpo import DPO
from pref.plugins.moving_reference import mix_into_reference
from pref.plugins.dpo_losses import (
    LOSS_TYPES,
    check_options,
    dpo_loss,
    f_divergence_scores,
    length_desensitised_logps,
    wpo_weights,
)
from test_dpo_loss import BETA, TableReference, hand_logps, random_pairs

# ---------------------------------------------------------------------------
# TRL 1.16 on fixed log-probs.
# ---------------------------------------------------------------------------


class FakeLM:
    """Returns fixed per-token outputs, as TRL's fused-LM-head model would."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # what accelerate's `is_peft_model` looks at

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        self.log_probs = log_probs
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(
            log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
        )


def trl_dpo(policy_tokens, reference_tokens, completion_mask, log_sum_sq_probs=None, **options):
    """TRL's mean loss and train metrics, with a frozen reference model (so ld_alpha applies to it too).

    policy_tokens, reference_tokens: [2B, T] log p(token t) on completion tokens (pref's alignment), chosen first.
    log_sum_sq_probs: [2B, T] log sum_v p(v)^2 at each position (pref's alignment), for use_weighting.
    options: DPOConfig fields (loss_type as a list, beta, label_smoothing, loss_weights, ...).
    """
    trl = pytest.importorskip("trl")
    trainer = object.__new__(trl.DPOTrainer)
    loss_types = options.pop("loss_type")
    attributes = {
        "model": FakeLM(policy_tokens[:, 1:], None if log_sum_sq_probs is None else log_sum_sq_probs[:, 1:]),
        "ref_model": FakeLM(reference_tokens[:, 1:]),
        "accelerator": SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        "args": SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=options.pop("discopop_tau", 0.05)),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        "aux_loss_enabled": False,
        "precompute_ref_logps": False,
        "loss_types": loss_types,
        "loss_weights": options.pop("loss_weights", None) or [1.0] * len(loss_types),
        "beta": 0.1,
        "label_smoothing": 0.0,
        "use_weighting": False,
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        **options,
    }
    for name, value in attributes.items():
        setattr(trainer, name, value)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def ours(policy_tokens, reference_tokens, completion_mask, logits=None, **options):
    """pref's mean loss on the same log-probs, through the public functions, with TRL's option names."""
    n = len(completion_mask) // 2
    mask = completion_mask.clone()
    mask[:, 0] = 0
    ld_alpha = options.pop("ld_alpha", None)
    use_weighting = options.pop("use_weighting", False)
    if ld_alpha is None:
        policy, reference = policy_tokens.sum(-1), reference_tokens.sum(-1)
        policy_chosen, policy_rejected, reference_chosen, reference_rejected = policy[:n], policy[n:], reference[:n], reference[n:]
    else:
        policy_chosen, policy_rejected = length_desensitised_logps(policy_tokens[:n], policy_tokens[n:], mask[:n], mask[n:], ld_alpha)
        reference_chosen, reference_rejected = length_desensitised_logps(reference_tokens[:n], reference_tokens[n:], mask[:n], mask[n:], ld_alpha)
    pair_weights = None
    if use_weighting:
        weights = wpo_weights(policy_tokens, logits, mask)
        pair_weights = weights[:n] * weights[n:]
    chosen_token_nll = -policy_tokens[:n][mask[:n].bool()].mean()
    lengths = mask.sum(-1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
        chosen_token_nll=chosen_token_nll, pair_weights=pair_weights, **options,
    )
    return losses, chosen_rewards, rejected_rewards


PAIRWISE = [t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")]
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_trl(loss_type):
    completion_mask, policy_tokens, reference_tokens = random_pairs(n=6, seed=4)
    options = {"beta": 0.3, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    losses, chosen_rewards, rejected_rewards = ours(policy_tokens, reference_tokens, completion_mask, loss_type=loss_type, **options)
    trl_loss, trl_metrics = trl_dpo(policy_tokens, reference_tokens, completion_mask, loss_type=[loss_type], **options)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5, rel=1e-5)
    assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("loss_type", PAIRWISE)
def test_pairwise_loss_types_match_trl_pair_by_pair(loss_type):
    """Losses that treat each pair alone: our [B] losses equal TRL's loss on each single pair."""
    completion_mask, policy_tokens, reference_tokens = random_pairs(n=4, seed=5)
    n = 4
    options = {"beta": 0.2, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    losses, _, _ = ours(policy_tokens, reference_tokens, completion_mask, loss_type=loss_type, **options)
    for i in range(n):
        rows = [i, n + i]
        trl_loss, _ = trl_dpo(policy_tokens[rows], reference_tokens[rows], completion_mask[rows], loss_type=[loss_type], **options)
        assert losses[i].item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5), i


def test_discopop_tau_matches_trl():
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=6)
    losses, _, _ = ours(policy_tokens, reference_tokens, completion_mask, loss_type="discopop", beta=0.5, discopop_tau=0.3)
    trl_loss, _ = trl_dpo(policy_tokens, reference_tokens, completion_mask, loss_type=["discopop"], beta=0.5, discopop_tau=0.3)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)


def test_weighted_combination_matches_trl():
    """MPO: -o loss_type=sigmoid,bco_pair,sft -o loss_weights=0.8,0.2,1.0."""
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=7)
    losses, _, _ = ours(policy_tokens, reference_tokens, completion_mask, loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0")
    trl_loss, _ = trl_dpo(policy_tokens, reference_tokens, completion_mask, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_alpha_matches_trl(ld_alpha):
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=8)
    losses, _, _ = ours(policy_tokens, reference_tokens, completion_mask, loss_type="sigmoid", ld_alpha=ld_alpha)
    trl_loss, trl_metrics = trl_dpo(policy_tokens, reference_tokens, completion_mask, loss_type=["sigmoid"], ld_alpha=ld_alpha)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize(
    "f_divergence_type,coef",
    [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.0), ("alpha_divergence", 2.0)],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "hinge"])
def test_f_divergences_match_trl(f_divergence_type, coef, loss_type):
    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=9)
    options = {"f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": coef, "beta": 0.2}
    losses, _, _ = ours(policy_tokens, reference_tokens, completion_mask, loss_type=loss_type, **options)
    trl_loss, _ = trl_dpo(policy_tokens, reference_tokens, completion_mask, loss_type=[loss_type], **options)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)


def logits_and_tokens(n=4, width=8, vocab=11, seed=10):
    """Random logits and token ids; the token log-probs they give on a random completion mask."""
    generator = torch.Generator().manual_seed(seed)
    completion_mask, _, reference_tokens = random_pairs(n=n, width=width, seed=seed)
    logits = torch.randn(2 * n, width, vocab, generator=generator)
    ids = torch.randint(vocab, (2 * n, width), generator=generator)
    mask = completion_mask.clone()
    mask[:, 0] = 0
    policy_tokens = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    log_sum_sq_probs = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1)
    return completion_mask, policy_tokens, reference_tokens, logits, log_sum_sq_probs


# TRL 1.16 crashes on use_weighting with "sft" (an in-place product on an expanded tensor); pref weights it like the others
@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["sigmoid", "hinge"]])
def test_wpo_weighting_matches_trl(loss_type):
    completion_mask, policy_tokens, reference_tokens, logits, log_sum_sq_probs = logits_and_tokens()
    losses, _, _ = ours(policy_tokens, reference_tokens, completion_mask, logits=logits, loss_type=loss_type, use_weighting=True)
    trl_loss, _ = trl_dpo(policy_tokens, reference_tokens, completion_mask, log_sum_sq_probs=log_sum_sq_probs, loss_type=loss_type, use_weighting=True)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)


def test_tr_dpo_mixing_matches_trl():
    trl_callbacks = pytest.importorskip("trl.trainer.callbacks")
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    theirs = torch.nn.Linear(3, 2)
    theirs.load_state_dict(reference.state_dict())
    mix_into_reference(reference, policy, 0.6)
    trl_callbacks.SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    for mine, expected in zip(reference.parameters(), theirs.parameters()):
        assert_close(mine, expected)


# ---------------------------------------------------------------------------
# By hand, on the pairs of tests/test_dpo_loss.py:
# chosen log-ratios [1, -1, 0], rejected [-1, 1, 0]; beta 0.5 -> margins m = [1, -1, 0],
# chosen rewards [0.5, -0.5, 0], rejected rewards [-0.5, 0.5, 0].
# s(x) = sigmoid(x): s(0.5) = 0.62246, s(-0.5) = 0.37754, s(1) = 0.73106, s(-1) = 0.26894.
# softplus(x) = log(1 + e^x) = -logsigmoid(-x).
# ---------------------------------------------------------------------------


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def by_hand(loss_type, **options):
    losses, _, _ = dpo_loss(*hand_logps(), beta=BETA, loss_type=loss_type, **options)
    return losses


def test_exo_pair_by_hand():
    """eps = 0.1: s(m) (log s(m) - log 0.9) + s(-m) (log s(-m) - log 0.1).

    m = 0: 0.5 (log 0.5 - log 0.9) + 0.5 (log 0.5 - log 0.1) = 0.5 log(0.25 / 0.09) = 0.51083.
    """
    expected = [sigmoid(m) * (math.log(sigmoid(m)) - math.log(0.9)) + sigmoid(-m) * (math.log(sigmoid(-m)) - math.log(0.1)) for m in (1, -1, 0)]
    assert_close(by_hand("exo_pair", label_smoothing=0.1), torch.tensor(expected))
    assert expected[2] == pytest.approx(0.5 * math.log(0.25 / 0.09))


def test_nca_pair_by_hand():
    """softplus(-rc) + 0.5 softplus(rc) + 0.5 softplus(rr), with rc = [0.5, -0.5, 0], rr = [-0.5, 0.5, 0].

    Pair 3: log 2 + 0.5 log 2 + 0.5 log 2 = 2 log 2 = 1.38629.
    """
    expected = [softplus(-rc) + 0.5 * softplus(rc) + 0.5 * softplus(rr) for rc, rr in ((0.5, -0.5), (-0.5, 0.5), (0, 0))]
    assert_close(by_hand("nca_pair"), torch.tensor(expected))
    assert expected[2] == pytest.approx(2 * math.log(2))


def test_bco_pair_by_hand():
    """softplus(-rc) + softplus(rr): [2 softplus(-0.5), 2 softplus(0.5), 2 log 2] = [0.94815, 1.94815, 1.38629]."""
    assert_close(by_hand("bco_pair"), torch.tensor([2 * softplus(-0.5), 2 * softplus(0.5), 2 * math.log(2)]))
    assert_close(by_hand("bco_pair"), torch.tensor([0.94815, 1.94815, 1.38629]), atol=1e-5, rtol=0)


def test_sppo_hard_by_hand():
    """(chosen - 0.5 / beta)^2 + (rejected + 0.5 / beta)^2 with 0.5 / 0.5 = 1.

    chosen [1, -1, 0] -> [0, 4, 1]; rejected [-1, 1, 0] -> [0, 4, 1]; sums [0, 8, 2].
    """
    assert_close(by_hand("sppo_hard"), torch.tensor([0.0, 8.0, 2.0]))


def test_aot_by_hand():
    """Sorted policy log-ratios (chosen - rejected) minus sorted reference ones.

    policy: [-1 - -3, -4 - -2, -2 - -4] = [2, -2, 2] -> sorted [-2, 2, 2];
    reference: [0, 0, 2] -> sorted [0, 0, 2]; deltas [-2, 2, 0]; beta 0.5 -> [-1, 1, 0].
    Loss softplus(-x): [1.31326, 0.31326, 0.69315].
    """
    assert_close(by_hand("aot"), torch.tensor([softplus(1), softplus(-1), math.log(2)]))


def test_aot_unpaired_by_hand():
    """Sorted chosen log-ratios [-1, 0, 1] minus sorted rejected [-1, 0, 1] = 0: log 2 each."""
    assert_close(by_hand("aot_unpaired"), torch.full((3,), math.log(2)))


def test_apo_zero_by_hand():
    """1 - s(rc) + s(rr): [1 - 0.62246 + 0.37754, 1 - 0.37754 + 0.62246, 1] = [0.75508, 1.24492, 1]."""
    assert_close(by_hand("apo_zero"), torch.tensor([1 - sigmoid(0.5) + sigmoid(-0.5), 1 - sigmoid(-0.5) + sigmoid(0.5), 1.0]))
    assert_close(by_hand("apo_zero"), torch.tensor([0.75508, 1.24492, 1.0]), atol=1e-5, rtol=0)


def test_apo_down_by_hand():
    """s(rc) + 1 - s(m): [0.62246 + 0.26894, 0.37754 + 0.73106, 0.5 + 0.5] = [0.89140, 1.10860, 1]."""
    assert_close(by_hand("apo_down"), torch.tensor([sigmoid(0.5) + 1 - sigmoid(1), sigmoid(-0.5) + 1 - sigmoid(-1), 1.0]))
    assert_close(by_hand("apo_down"), torch.tensor([0.89140, 1.10860, 1.0]), atol=1e-5, rtol=0)


def test_discopop_by_hand():
    """tau = 1: softplus(-m) (1 - s(m)) + e^-m s(m).

    m = 0: log 2 * 0.5 + 1 * 0.5 = 0.84657.
    m = 1: 0.31326 * 0.26894 + 0.36788 * 0.73106 = 0.35319.
    """
    expected = [softplus(-m) * (1 - sigmoid(m)) + math.exp(-m) * sigmoid(m) for m in (1, -1, 0)]
    assert_close(by_hand("discopop", discopop_tau=1.0), torch.tensor(expected))
    assert expected[2] == pytest.approx(0.84657, abs=1e-5, rel=1e-5)
    assert expected[0] == pytest.approx(0.35319, abs=1e-5, rel=1e-5)


def test_sft_by_hand():
    """Every pair carries the batch's chosen token NLL."""
    assert_close(by_hand("sft", chosen_token_nll=torch.tensor(1.25)), torch.full((3,), 1.25))
    with pytest.raises(PrefError, match="chosen_token_nll"):
        by_hand("sft")


def test_sigmoid_norm_by_hand():
    """Per-token log-ratios: chosen [1, -1, 0] / [1, 2, 4] = [1, -0.5, 0], rejected [-1, 1, 0] / [1, 1, 2] = [-1, 1, 0].

    beta 0.5 x differences [2, -1.5, 0] = [1, -0.75, 0] -> softplus(-x) = [0.31326, 1.13943, 0.69315].
    """
    losses = by_hand("sigmoid_norm", chosen_lengths=torch.tensor([1, 2, 4]), rejected_lengths=torch.tensor([1, 1, 2]))
    assert_close(losses, torch.tensor([softplus(-1), softplus(0.75), math.log(2)]))


def test_weighted_combination_by_hand():
    """0.8 sigmoid + 0.2 hinge: 0.8 [0.31326, 1.31326, 0.69315] + 0.2 [0, 2, 1]."""
    losses = by_hand("sigmoid,hinge", loss_weights="0.8,0.2")
    assert_close(losses, torch.tensor([0.8 * softplus(-1), 0.8 * softplus(1) + 0.4, 0.8 * math.log(2) + 0.2]))
    assert_close(by_hand(["sigmoid", "hinge"], loss_weights=[0.8, 0.2]), losses)


def test_pair_weights_by_hand():
    """WPO weights [1, 0.5, 0] scale the sigmoid losses pair by pair."""
    losses = by_hand("sigmoid", pair_weights=torch.tensor([1.0, 0.5, 0.0]))
    assert_close(losses, torch.tensor([softplus(-1), 0.5 * softplus(1), 0.0]))


def test_f_divergence_scores_by_hand():
    """log-ratios [0, log 2, -log 2], i.e. t = [1, 2, 0.5].

    forward KL 1 - 1/t: [0, 0.5, -1]; JS log(2t / (t + 1)): [0, log(4/3), log(2/3)];
    alpha 0.5, (t^-0.5 - 1) / -0.5: [0, 2 - sqrt 2, 2 - 2 sqrt 2].
    """
    logratios = torch.tensor([0.0, math.log(2), -math.log(2)])
    assert_close(f_divergence_scores(logratios, "reverse_kl"), logratios)
    assert_close(f_divergence_scores(logratios, "forward_kl"), torch.tensor([0.0, 0.5, -1.0]))
    assert_close(f_divergence_scores(logratios, "js_divergence"), torch.tensor([0.0, math.log(4 / 3), math.log(2 / 3)]))
    assert_close(f_divergence_scores(logratios, "alpha_divergence", 0.5), torch.tensor([0.0, 2 - math.sqrt(2), 2 - 2 * math.sqrt(2)]))
    assert_close(f_divergence_scores(logratios, "alpha_divergence", 1.0), logratios)


def test_length_desensitised_logps_by_hand():
    """Chosen tokens [-1, -2, -3] (3 long), rejected [-4] (1 long): shared length 1.

    ld_alpha 0.5: chosen -1 + 0.5 (-2 - 3) = -3.5, rejected -4.
    """
    chosen_tokens = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    rejected_tokens = torch.tensor([[0.0, 0.0, -4.0, 0.0]])
    chosen_mask = torch.tensor([[0, 1, 1, 1]])
    rejected_mask = torch.tensor([[0, 0, 1, 0]])
    chosen, rejected = length_desensitised_logps(chosen_tokens, rejected_tokens, chosen_mask, rejected_mask, 0.5)
    assert_close(chosen, torch.tensor([-3.5]))
    assert_close(rejected, torch.tensor([-4.0]))


def test_wpo_weights_by_hand():
    """Two equally likely tokens: p = 0.5 each, log sum p^2 = log 0.5, so log p - log sum p^2 = 0: weight 1.

    A sure token (p = 1 - tiny): log p = 0, sum p^2 = 1: weight 1 as well; uniform over 4 and picking
    one: log 0.25 - log 0.25 = 0. A skewed [0.75, 0.25] picking the rare token:
    log 0.25 - log(0.625) = log 0.4 -> weight 0.4.
    """
    logits = torch.log(torch.tensor([[[1.0, 1.0, 1e-9, 1e-9], [0.75, 0.25, 1e-9, 1e-9]]]))
    mask = torch.tensor([[0, 1]])
    tokens = torch.tensor([[0.0, math.log(0.25)]])
    assert_close(wpo_weights(tokens, logits, mask), torch.tensor([0.4]), atol=1e-5, rtol=0)


def test_mix_into_reference_by_hand():
    """alpha 0.25: 0.25 * 4 + 0.75 * 0 = 1."""
    policy, reference = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    policy.weight.data.fill_(4.0)
    reference.weight.data.fill_(0.0)
    mix_into_reference(reference, policy, 0.25)
    assert reference.weight.item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Rejected options and combinations (one-line PrefErrors, as TRL rejects them).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ({"loss_type": "sigmoid,nope"}, "unknown DPO loss_type 'nope'"),
        ({"loss_type": "sigmoid,hinge", "loss_weights": "1"}, "one weight per loss_type"),
        ({"loss_type": "sigmoid", "loss_weights": "a"}, "numbers separated by commas"),
        ({"loss_type": "exo_pair"}, "needs label_smoothing"),
        ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "does not apply to loss_type bco_pair"),
        ({"loss_type": "aot", "use_weighting": True}, "use_weighting"),
        ({"loss_type": "sigmoid", "f_divergence_type": "kl"}, "unknown f_divergence_type"),
        ({"loss_type": "sigmoid", "ld_alpha": 1.5}, "ld_alpha must lie in"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing only applies"),
        ({"loss_type": "sigmoid,sigmoid"}, "names a loss twice"),
    ],
)
def test_rejected_options(options, message):
    with pytest.raises(PrefError, match=message):
        check_options(0.1, **options)
    with pytest.raises(PrefError, match=message):
        DPO(**options)


def test_tr_dpo_options_are_checked():
    with pytest.raises(PrefError, match="ref_model_mixup_alpha"):
        DPO(sync_ref_model=True, ref_model_mixup_alpha=0.0)
    with pytest.raises(PrefError, match="ref_model_sync_steps"):
        DPO(sync_ref_model=True, ref_model_sync_steps=0)
    with pytest.raises(PrefError, match="reference_free"):
        DPO(sync_ref_model=True, reference_free=True)


def test_ld_alpha_refuses_a_cached_reference():
    """A cache holds only summed log-probs: LD-DPO cannot split them, so it says so instead of training wrong."""
    from test_dpo_loss import IdPolicy, id_batch

    class Cached(TableReference):
        has_logits = False

    with pytest.raises(PrefError, match="--reference model"):
        DPO(ld_alpha=0.5).loss(IdPolicy(), Cached(torch.zeros(4, 4)), id_batch())


class FrozenTableReference(TableReference):
    has_logits = True  # stands for a frozen model: per-token log-probs are real


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "sigmoid,bco_pair,sft", "loss_weights": "0.8,0.2,1.0"},
        {"loss_type": "sigmoid", "ld_alpha": 0.3},
        {"loss_type": "ipo", "f_divergence_type": "js_divergence", "beta": 0.5},
        {"loss_type": "exo_pair", "label_smoothing": 0.01},
    ],
)
def test_objective_with_options_matches_trl(options):
    """The whole objective (scoring, LD-DPO log-probs, the sft term) against TRL on the same per-token log-probs."""
    from test_dpo_loss import TablePolicy

    from pref.interfaces import PairBatch
    from pref.sequences import Sequences

    completion_mask, policy_tokens, reference_tokens = random_pairs(seed=11)
    n = len(completion_mask) // 2
    ones = torch.ones_like(completion_mask)
    batch = PairBatch(Sequences(ones[:n], ones[:n], completion_mask[:n]), Sequences(ones[n:], ones[n:], completion_mask[n:]))
    loss, metrics = DPO(**options).loss(TablePolicy(policy_tokens), FrozenTableReference(reference_tokens), batch)

    trl_options = dict(options)
    trl_options["loss_type"] = options["loss_type"].split(",")
    if "loss_weights" in options:
        trl_options["loss_weights"] = [float(w) for w in options["loss_weights"].split(",")]
    trl_loss, trl_metrics = trl_dpo(policy_tokens, reference_tokens, completion_mask, **trl_options)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5, rel=1e-5), name


@pytest.mark.parametrize("name", ["dpo", "online-dpo", "divpo", "d2po"])
def test_every_dpo_objective_takes_the_new_options(name):
    """Online DPO, DivPO and D2PO reuse the DPO objective: the options reach its loss."""
    from pref.registry import load_registry

    registry = load_registry()
    options = {"loss_type": "sigmoid,sft", "loss_weights": "0.8,1.0", "f_divergence_type": "js_divergence", "discopop_tau": 0.1}
    objective = registry.create("objective", name, options, registry=registry)
    assert objective.loss_types == ["sigmoid", "sft"] and objective.loss_weights == [0.8, 1.0]
    assert objective.f_divergence_type == "js_divergence" and objective.discopop_tau == 0.1
    with pytest.raises(PrefError, match="does not apply to loss_type bco_pair"):
        registry.create("objective", name, {"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, registry=registry)


def test_tr_dpo_moves_the_frozen_reference_every_sync_steps():
    """ref_model_sync_steps 2, alpha 0.5: unchanged after step 1; after step 2 halfway to the policy (0 -> 2 with policy 4)."""
    from pref.reference import FrozenReference

    policy_model, reference_model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    policy_model.weight.data.fill_(4.0)
    reference_model.weight.data.fill_(0.0)
    policy, reference = SimpleNamespace(model=policy_model), FrozenReference(reference_model)
    objective = DPO(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2)
    assert objective.needs.reference == "distributions"  # auto keeps a frozen model, never a cache
    objective.after_step(1, policy, reference)
    assert reference_model.weight.item() == 0.0
    objective.after_step(2, policy, reference)
    assert reference_model.weight.item() == pytest.approx(2.0)
    DPO().after_step(2, policy, reference)  # without sync_ref_model nothing moves
    assert reference_model.weight.item() == pytest.approx(2.0)


def test_tr_dpo_trains_from_the_cli(tmp_path, tiny_model_dir, prefs_file):
    """With sync every step the reference follows the policy: step 2's rewards are no longer measured from the start."""
    import json
    import os

    from click.testing import CliRunner

    from pref.cli.main import cli

    out = str(tmp_path / "run")
    result = CliRunner().invoke(cli, ["run", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", out, "--objective", "dpo",
                                      "--dataset", prefs_file, "--steps", "2", "--batch-size", "2",
                                      "-o", "sync_ref_model=true", "-o", "ref_model_sync_steps=1", "-o", "ref_model_mixup_alpha=1.0"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # alpha 1 copies the policy into the reference after step 1: step 2 starts with rewards of exactly 0
    assert lines[1]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and lines[1]["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
