"""SimPO's loss worked out by hand, and the objective as pref's training loop calls it."""

import math

import pytest
import torch
from torch.testing import assert_close

from pref import Logps, PairBatch, PrefError, Sequences
from pref_simpo.simpo import SimPO, simpo_loss


# docs-start: hand-computed-loss
def test_simpo_loss_by_hand():
    """beta = 2, gamma = 1; margins are 2 x (chosen - rejected) - 1:

    pair 0: 2 x (-1.0 + 2.0) - 1 =  1  ->  -log sigmoid(1)  = log(1 + e^-1) = 0.31326
    pair 1: 2 x (-2.0 + 1.0) - 1 = -3  ->  -log sigmoid(-3) = log(1 + e^3)  = 3.04859
    pair 2: 2 x (-0.5 + 0.5) - 1 = -1  ->  -log sigmoid(-1) = log(1 + e^1)  = 1.31326
    """
    chosen = torch.tensor([-1.0, -2.0, -0.5])
    rejected = torch.tensor([-2.0, -1.0, -0.5])
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    assert_close(losses, torch.tensor([0.31326, 3.04859, 1.31326]), atol=1e-5, rtol=0)
    assert_close(chosen_rewards, torch.tensor([-2.0, -4.0, -1.0]))
    assert_close(rejected_rewards, torch.tensor([-4.0, -2.0, -1.0]))
# docs-end: hand-computed-loss


class EveryTokenHalf:
    """A stand-in policy: every completion token has log-prob -0.5."""

    class tokenizer:
        pad_token_id = 0

    def logps(self, sequences):
        tokens = -0.5 * sequences.completion_mask.float()
        return Logps(tokens, sequences.completion_mask, tokens.sum(-1))


def rows(completion_tokens):
    """One row: a 1-token prompt and `completion_tokens` completion tokens."""
    n = 1 + completion_tokens
    return Sequences(torch.arange(1, n + 1)[None], torch.ones(1, n, dtype=torch.long), torch.tensor([[0] + [1] * completion_tokens]))


def test_loss_uses_per_token_averages_not_sums():
    """Both answers average -0.5 per token, so the margin is -gamma = -1 whatever their lengths:
    loss = log(1 + e^1) = 1.31326 (summed log-probs, -2.0 against -0.5, would give another value)."""
    batch = PairBatch(chosen=rows(4), rejected=rows(1))
    loss, metrics = SimPO(beta=2.0, gamma_beta_ratio=0.5).loss(EveryTokenHalf(), None, batch)
    assert loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(-0.5)
    assert metrics["rewards/margins"] == pytest.approx(0.0)


def test_simpo_needs_no_reference_and_checks_its_options():
    assert SimPO.needs.reference == "none"
    assert SimPO(beta=4.0, gamma_beta_ratio=0.25).gamma == 1.0
    with pytest.raises(PrefError, match="beta must be positive"):
        SimPO(beta=0.0)
