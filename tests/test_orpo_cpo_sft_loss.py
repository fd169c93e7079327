"""ORPO, CPO/SimPO/AlphaPO and SFT losses: parity with TRL 1.16, and by hand."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from pref.errors import PrefError
from pref.plugins.cpo import AVERAGED_LOSS_TYPES, cpo_loss
from pref.plugins.orpo import log1mexp, orpo_loss
from pref.plugins.sft import sft_loss


def average_logps(seed=0, n=6):
    """Per-token average log-probs of chosen and rejected answers, in (-3, -0.01)."""
    generator = torch.Generator().manual_seed(seed)
    return -3 * torch.rand(n, generator=generator) - 0.01, -3 * torch.rand(n, generator=generator) - 0.01


def cpu_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)


# ---------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    orpo = pytest.importorskip("trl.experimental.orpo")
    chosen, rejected = average_logps(seed=1)
    trainer = object.__new__(orpo.ORPOTrainer)
    trainer.beta, trainer.accelerator = beta, cpu_accelerator()
    their_losses, their_chosen, their_rejected, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(chosen, rejected)

    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen, rejected, beta=beta)
    # TRL returns beta * log sigmoid(log odds) and subtracts its mean from the NLL; pref returns the term to add
    assert_close(losses, -their_losses, atol=1e-5, rtol=1e-5)
    assert_close(chosen_rewards, their_chosen)
    assert_close(rejected_rewards, their_rejected)
    assert log_odds.mean().item() == pytest.approx(log_odds_chosen.item(), abs=1e-6)
    assert torch.nn.functional.logsigmoid(log_odds).mean().item() == pytest.approx(log_odds_ratio.item(), abs=1e-6)


def test_orpo_by_hand():
    """P(chosen) = 0.5, P(rejected) = 0.2: odds 1 and 0.25, log odds ratio log 4.

    Loss -beta log sigmoid(log 4) = -beta log(4 / 5) = beta * 0.22314; beta 0.5 -> 0.11157.
    """
    losses, _, _, log_odds = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), beta=0.5)
    assert log_odds.item() == pytest.approx(math.log(4), abs=1e-6)
    assert losses.item() == pytest.approx(0.5 * math.log(5 / 4), abs=1e-6)


def test_log1mexp_on_both_branches():
    """log(1 - e^x): x = log 0.5 -> log 0.5; x = -10 -> log(1 - e^-10)."""
    assert_close(log1mexp(torch.tensor([math.log(0.5), -10.0])), torch.tensor([math.log(0.5), math.log1p(-math.exp(-10.0))]))


# ---------------------------------------------------------------------------
# CPO, SimPO, AlphaPO
# ---------------------------------------------------------------------------

CPO_VARIANTS = [
    {"loss_type": "sigmoid", "beta": 0.1},
    {"loss_type": "sigmoid", "beta": 0.2, "label_smoothing": 0.1},
    {"loss_type": "hinge", "beta": 0.3},
    {"loss_type": "ipo", "beta": 0.5},
    {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
    {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.0, "label_smoothing": 0.05},
    {"loss_type": "alphapo", "beta": 2.0, "simpo_gamma": 0.5, "alpha": 0.25},
    {"loss_type": "sigmoid", "beta": 0.1, "alpha": -0.5},
]


@pytest.mark.parametrize("options", CPO_VARIANTS)
def test_cpo_matches_trl(options):
    cpo = pytest.importorskip("trl.experimental.cpo")
    chosen, rejected = average_logps(seed=2)
    trainer = object.__new__(cpo.CPOTrainer)
    settings = {"beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5, "alpha": 0.0, **options}
    # TRL's config turns "alphapo" into "simpo" (and cpo_alpha 0)
    settings["loss_type"] = "simpo" if options["loss_type"] == "alphapo" else options["loss_type"]
    for name, value in {**settings, "accelerator": cpu_accelerator()}.items():
        setattr(trainer, name, value)
    their_losses, their_chosen, their_rejected = trainer.cpo_loss(chosen, rejected)
    losses, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, **options)
    assert_close(losses, their_losses, atol=1e-5, rtol=1e-5)
    assert_close(chosen_rewards, their_chosen, atol=1e-5, rtol=1e-5)
    assert_close(rejected_rewards, their_rejected, atol=1e-5, rtol=1e-5)


def test_cpo_averages_where_trl_does():
    """TRL's CPO scores ipo and simpo (and so alphapo) on per-token averages."""
    assert set(AVERAGED_LOSS_TYPES) == {"ipo", "simpo", "alphapo"}


def test_simpo_by_hand():
    """Average log-probs chosen -1, rejected -2; beta 2, gamma 1: logits 1 - 1/2 = 0.5, loss softplus(-1) = 0.31326."""
    losses, chosen_rewards, _ = cpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, loss_type="simpo", simpo_gamma=1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(-2.0)


def test_alphapo_by_hand():
    """alpha 0.5, p_chosen = e^-1, p_rejected = e^-2: r = (1 - p^-0.5) / 0.5 = 2 (1 - e^(0.5)) and 2 (1 - e).

    r_chosen - r_rejected = 2 (e - e^0.5) = 2.13912; beta 1, gamma 0.5: logits 2.13912 - 0.5 = 1.63912;
    loss softplus(-1.63912) = 0.17744.
    """
    losses, _, _ = cpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=1.0, loss_type="alphapo", simpo_gamma=0.5, alpha=0.5)
    logits = 2 * (math.e - math.exp(0.5)) - 0.5
    assert losses.item() == pytest.approx(math.log1p(math.exp(-logits)), abs=1e-6)
    assert losses.item() == pytest.approx(0.17744, abs=1e-5)


def test_cpo_hinge_and_ipo_by_hand():
    """Summed log-probs chosen -1, rejected -3 (logits 2). Hinge, beta 0.25: relu(1 - 0.5) = 0.5. IPO, beta 0.5: (2 - 1)^2 = 1."""
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert cpo_loss(chosen, rejected, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert cpo_loss(chosen, rejected, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "options,message",
    [({"loss_type": "kto_pair"}, "unknown CPO loss_type"), ({"beta": -1.0}, "beta must be positive"), ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing only applies")],
)
def test_cpo_bad_options(options, message):
    with pytest.raises(PrefError, match=message):
        cpo_loss(torch.zeros(1), torch.zeros(1), **options)


# ---------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------


class FakeSFTModel:
    training = True

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        mask = (self.log_probs != 0)
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, label_mask=mask, entropy=zeros, is_top1=mask & False, aux_loss=None)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_matches_trl(loss_type):
    trl = pytest.importorskip("trl")
    generator = torch.Generator().manual_seed(4)
    mask = (torch.rand(4, 7, generator=generator) > 0.3).long()
    token_logps = -3 * torch.rand(4, 7, generator=generator) * mask - 0.01 * mask

    trainer = object.__new__(trl.SFTTrainer)
    model = FakeSFTModel(token_logps)
    for name, value in {
        "model": model,
        "aux_loss_enabled": False,
        "compute_loss_func": None,
        "label_smoother": None,
        "args": SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=False),
        "accelerator": SimpleNamespace(parallelism_config=None, gather_for_metrics=lambda x: x, device=torch.device("cpu")),
        "_metrics": {"train": __import__("collections").defaultdict(list), "eval": __import__("collections").defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }.items():
        setattr(trainer, name, value)
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "labels": mask}
    theirs = trainer.compute_loss(model, inputs)
    assert sft_loss(token_logps, mask, loss_type).item() == pytest.approx(theirs.item(), abs=1e-5, rel=1e-5)


def test_sft_by_hand():
    """Tokens -1, -2 on row 0 and -3 on row 1: NLL (1 + 2 + 3) / 3 = 2 (a token mean, not a mean of row means).

    DFT weights each by p = e^logp: (0.36788 + 0.27067 + 0.14936) / 3 = 0.26264.
    """
    token_logps = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert sft_loss(token_logps, mask).item() == pytest.approx(2.0)
    dft = (math.exp(-1) + 2 * math.exp(-2) + 3 * math.exp(-3)) / 3
    assert sft_loss(token_logps, mask, "dft").item() == pytest.approx(dft, abs=1e-6)
    assert dft == pytest.approx(0.26264, abs=1e-5)
    with pytest.raises(PrefError, match="unknown SFT loss_type"):
        sft_loss(token_logps, mask, "ce")
