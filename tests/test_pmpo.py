"""PMPO: the divergences and the loss by hand, the top-bottom selector, and short offline and online runs."""

import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

from pref.config import build_config
from pref.errors import PrefError
from pref.interfaces import CandidatePool, LabeledBatch, Policy, Reference
from pref.plugins import divergences, labeled_data, pmpo
from pref.plugins.divergences import divergence, js_divergence, kl_divergence, renyi_divergence
from pref.plugins.pmpo import PMPO, OnlinePMPO, TopBottomSelector, pmpo_loss, row_divergences
from pref.registry import Registry, get_plugin_manager, load_registry
from pref.sequences import Logps, Sequences, logps_from_logits
from pref.train import train

# p = [1/2, 1/2] and q = [1/4, 3/4], as log-probs (valid logits: log-softmax leaves them as they are)
P = torch.tensor([0.5, 0.5]).log()
Q = torch.tensor([0.25, 0.75]).log()


# -- divergences ---------------------------------------------------------------------------------


def test_kl_by_hand():
    """KL(p || q) = sum p log p/q:

    V=2: 1/2 log(1/2 / 1/4) + 1/2 log(1/2 / 3/4) = 1/2 log 2 + 1/2 log 2/3 = 1/2 log 4/3 = 0.143841
    V=3: p = [1/2, 1/4, 1/4], q = [1/4, 1/4, 1/2]: 1/2 log 2 + 0 + 1/4 log 1/2 = 1/4 log 2 = 0.173287
    """
    assert_close(kl_divergence(P, Q), torch.tensor(0.143841), atol=1e-6, rtol=0)
    p3, q3 = torch.tensor([0.5, 0.25, 0.25]).log(), torch.tensor([0.25, 0.25, 0.5]).log()
    assert_close(kl_divergence(p3, q3), torch.tensor(0.173287), atol=1e-6, rtol=0)


def test_kl_takes_logits_not_only_log_probs():
    """Logits [0, 0] and [0, log 3] are p and q up to a constant: the same KL."""
    assert_close(kl_divergence(torch.tensor([0.0, 0.0]) + 7.0, torch.tensor([0.0, math.log(3.0)])), torch.tensor(0.143841), atol=1e-6, rtol=0)


def test_js_by_hand():
    """JS = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2 = [3/8, 5/8]:

    KL(p || m) = 1/2 log(4/3) + 1/2 log(4/5)     = 1/2 log(16/15)   = 0.0322693
    KL(q || m) = 1/4 log(2/3) + 3/4 log(6/5)     = -0.1013663 + 0.1367414 = 0.0353750
    JS = (0.0322693 + 0.0353750) / 2 = 0.0338222
    """
    assert_close(js_divergence(P, Q), torch.tensor(0.0338222), atol=1e-6, rtol=0)
    assert_close(js_divergence(Q, P), js_divergence(P, Q))  # symmetric


def test_renyi_by_hand():
    """D_a(p || q) = log(sum p^a q^(1-a)) / (a - 1):

    a = 2:   log(1/4 / 1/4 + 1/4 / 3/4)         = log(4/3)               = 0.287682
    a = 1/2: -2 log(sqrt(1/8) + sqrt(3/8))      = -2 log(0.9659258)      = 0.0693364
    """
    assert_close(renyi_divergence(P, Q, 2.0), torch.tensor(0.287682), atol=1e-6, rtol=0)
    assert_close(renyi_divergence(P, Q, 0.5), torch.tensor(0.0693364), atol=1e-6, rtol=0)


def test_renyi_tends_to_kl_as_the_order_tends_to_1():
    torch.manual_seed(0)
    p, q = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    for order in (1 - 1e-4, 1 + 1e-4):
        assert_close(renyi_divergence(p, q, order), kl_divergence(p, q), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["kl", "js", "renyi"])
def test_every_divergence_is_zero_for_equal_distributions_and_positive_otherwise(name):
    torch.manual_seed(0)
    p, q = torch.randn(3, 6), torch.randn(3, 6)
    assert_close(divergence(name, p, p + 2.0, renyi_alpha=2.0), torch.zeros(3), atol=1e-6, rtol=0)
    assert (divergence(name, p, q, renyi_alpha=2.0) > 0).all()
    assert divergence(name, p, q).shape == (3,)  # one per position: [...] from [..., V]


def test_divergences_stay_finite_on_extreme_logits():
    """Log space: p = [1, e^-2000], q = [e^-2000, 1] gives KL = 2000, not inf or NaN; a -inf logit contributes 0."""
    p, q = torch.tensor([1000.0, -1000.0]), torch.tensor([-1000.0, 1000.0])
    assert_close(kl_divergence(p, q), torch.tensor(2000.0))
    assert torch.isfinite(js_divergence(p, q)) and js_divergence(p, q) <= math.log(2) + 1e-6
    assert torch.isfinite(renyi_divergence(p, q, 0.5))
    # p = [1, 0], q = [1/2, 1/2]: KL = 1 x log(1 / (1/2)) = log 2
    assert_close(kl_divergence(torch.tensor([0.0, -math.inf]), torch.tensor([0.0, 0.0])), torch.tensor(math.log(2)))


def test_half_precision_logits_are_widened():
    """Under autocast the policy's logits may be bfloat16; the divergence is computed in float32."""
    result = kl_divergence(P.bfloat16(), Q.bfloat16())
    assert result.dtype == torch.float32
    assert_close(result, torch.tensor(0.143841), atol=2e-2, rtol=0)


@pytest.mark.parametrize("order", [1.0, 0.0, -0.5])
def test_a_renyi_order_of_1_or_below_0_is_an_error(order):
    with pytest.raises(PrefError, match="renyi_alpha"):
        renyi_divergence(P, Q, order)


def test_an_unknown_divergence_is_an_error():
    with pytest.raises(PrefError, match="choose one of kl, js, renyi"):
        divergence("tv", P, Q)


# -- the loss --------------------------------------------------------------------------------------

LOGPS = torch.tensor([-1.0, -2.0, -3.0, -4.0])
LABELS = torch.tensor([True, False, True, False])


def test_loss_with_both_sets_by_hand():
    """alpha = 0.8, beta = 0.1: accepted mean (-1 - 3) / 2 = -2, rejected mean (-2 - 4) / 2 = -3, divergence mean 0.25:

    loss = -0.8 x -2 + 0.2 x -3 + 0.1 x 0.25 = 1.6 - 0.6 + 0.025 = 1.025
    d loss / d logps = -0.8 / 2 on accepted rows, +0.2 / 2 on rejected rows.
    """
    logps = LOGPS.clone().requires_grad_()
    loss = pmpo_loss(logps, LABELS, torch.tensor([0.1, 0.2, 0.3, 0.4]), alpha=0.8, beta=0.1)
    assert_close(loss, torch.tensor(1.025))
    loss.backward()
    assert_close(logps.grad, torch.tensor([-0.4, 0.1, -0.4, 0.1]))


def test_loss_with_accepted_rows_only_drops_the_rejected_term():
    """alpha = 0.5: -0.5 x mean(-1, -3) = 1.0; no NaN from an empty rejected mean."""
    assert_close(pmpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([True, True]), alpha=0.5), torch.tensor(1.0))


def test_loss_with_rejected_rows_only_drops_the_accepted_term():
    """alpha = 0.5: +0.5 x mean(-2, -4) = -1.5; with beta = 0.5 and divergences [1, 3]: -1.5 + 0.5 x 2 = -0.5."""
    assert_close(pmpo_loss(torch.tensor([-2.0, -4.0]), torch.tensor([False, False]), alpha=0.5), torch.tensor(-1.5))
    assert_close(pmpo_loss(torch.tensor([-2.0, -4.0]), torch.tensor([False, False]), torch.tensor([1.0, 3.0]), 0.5, 0.5), torch.tensor(-0.5))


def test_alpha_1_ignores_the_rejected_rows_and_alpha_0_the_accepted():
    """alpha = 1: -mean(accepted) = 2; alpha = 0: +mean(rejected) = -3."""
    assert_close(pmpo_loss(LOGPS, LABELS, alpha=1.0), torch.tensor(2.0))
    assert_close(pmpo_loss(LOGPS, LABELS, alpha=0.0), torch.tensor(-3.0))


def test_row_divergence_averages_over_completion_tokens_only():
    """Two rows of three positions; position 0 is prompt, padding is masked out.

    KL(p || q) = 0.143841 where the reference gives p and the policy q, 0 where they agree:
    row 0: positions 1 and 2 count, KL 0.143841 and 0 -> 0.0719205
    row 1: position 1 counts (KL 0.143841); position 2 is padding with wildly different logits, ignored.
    """
    reference = torch.stack([P, P, P]).expand(2, 3, 2).clone()
    policy = torch.stack([P, Q, P]).expand(2, 3, 2).clone()
    policy[1, 2] = torch.tensor([50.0, -50.0])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    zeros = torch.zeros(2, 3)
    result = row_divergences(Logps(zeros, mask, zeros.sum(-1), reference), Logps(zeros, mask, zeros.sum(-1), policy))
    assert_close(result, torch.tensor([0.0719205, 0.143841]), atol=1e-6, rtol=0)


class LogitsPolicy(Policy):
    """A 'model' that is one learnable logits tensor [B, T, V] over fixed rows."""

    def __init__(self, logits):
        self.logits = logits
        self.tokenizer = None

    def logps(self, sequences, with_logits=False, with_hidden=False, temperature=1.0):
        return logps_from_logits(self.logits, sequences, keep_logits=with_logits)

    def generate(self, prompts, k, sampling):
        raise NotImplementedError

    def encode(self, prompts, completions, max_prompt_length=None):
        raise NotImplementedError

    def save(self, path):
        raise NotImplementedError


class LogitsReference(Reference):
    has_logits = True

    def __init__(self, logits):
        self.logits = logits

    def logps(self, sequences, with_logits=False, temperature=1.0):
        return logps_from_logits(self.logits, sequences, keep_logits=with_logits)


def labeled_batch():
    """Three rows of four tokens over V = 3; prompt is token 0, completions tokens 1-3 (row 2 is padded at 3)."""
    sequences = Sequences(
        input_ids=torch.tensor([[0, 1, 2, 0], [0, 2, 2, 1], [0, 1, 1, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]),
        completion_mask=torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0]]),
    )
    return LabeledBatch(sequences, torch.tensor([True, False, True]))


def test_objective_loss_is_pmpo_loss_on_sequence_logps_and_token_divergences():
    torch.manual_seed(0)
    batch = labeled_batch()
    policy = LogitsPolicy(torch.randn(3, 4, 3, requires_grad=True))
    reference = LogitsReference(torch.randn(3, 4, 3))
    objective = PMPO(alpha=0.7, beta=0.2, divergence="js")
    loss, metrics = objective.loss(policy, reference, batch)

    policy_logps = policy.logps(batch.sequences, with_logits=True)
    reference_logps = reference.logps(batch.sequences, with_logits=True)
    divergences = row_divergences(reference_logps, policy_logps, "js")
    assert_close(loss, pmpo_loss(policy_logps.sequence, batch.labels, divergences, alpha=0.7, beta=0.2))
    assert metrics["rows/accepted"] == 2.0 and metrics["rows/rejected"] == 1.0
    assert metrics["logps/accepted"] == pytest.approx(policy_logps.sequence[[0, 2]].mean().item())
    assert metrics["logps/rejected"] == pytest.approx(policy_logps.sequence[1].item())
    assert metrics["divergence"] == pytest.approx(divergences.mean().item())
    loss.backward()
    assert policy.logits.grad is not None and policy.logits.grad.abs().sum() > 0


def test_divergence_metric_is_zero_when_the_policy_is_the_reference():
    logits = torch.randn(3, 4, 3)
    _, metrics = PMPO().loss(LogitsPolicy(logits.clone().requires_grad_()), LogitsReference(logits), labeled_batch())
    assert metrics["divergence"] == pytest.approx(0.0, abs=1e-6)


def test_a_batch_without_rejected_rows_reports_zero_for_them():
    batch = labeled_batch()
    batch.labels = torch.tensor([True, True, True])
    logits = torch.randn(3, 4, 3)
    loss, metrics = PMPO().loss(LogitsPolicy(logits.clone().requires_grad_()), LogitsReference(logits), batch)
    assert torch.isfinite(loss)
    assert (metrics["rows/accepted"], metrics["rows/rejected"], metrics["logps/rejected"]) == (3.0, 0.0, 0.0)


class CachedLike(Reference):
    has_logits = False

    def logps(self, sequences, with_logits=False, temperature=1.0):
        raise AssertionError("not to be called")


@pytest.mark.parametrize("reference", [None, CachedLike()])
def test_a_reference_without_distributions_is_an_error_naming_the_fix(reference):
    with pytest.raises(PrefError, match="--reference model"):
        PMPO().loss(LogitsPolicy(torch.randn(3, 4, 3)), reference, labeled_batch())


def test_beta_0_needs_no_reference():
    objective = PMPO(beta=0.0)
    assert objective.needs.reference == "none" and PMPO.needs.reference == "distributions"  # per instance, not for the class
    loss, metrics = objective.loss(LogitsPolicy(torch.randn(3, 4, 3, requires_grad=True)), None, labeled_batch())
    assert metrics["divergence"] == 0.0 and loss.requires_grad


@pytest.mark.parametrize(
    "options, message",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"divergence": "tv"}, "unknown divergence"),
        ({"divergence": "renyi", "renyi_alpha": 1.0}, "renyi_alpha"),
        ({"accept_fraction": 1.2}, "accept_fraction"),
    ],
)
def test_bad_options_are_errors(options, message):
    with pytest.raises(PrefError, match=message):
        OnlinePMPO(**options)


def test_objectives_declare_what_they_need():
    assert (PMPO.needs.data, PMPO.needs.dataset_builder, PMPO.needs.reference, PMPO.needs.online) == ("sets", "labeled", "distributions", False)
    assert (OnlinePMPO.needs.online, OnlinePMPO.needs.samples_per_prompt, OnlinePMPO.needs.data) == (True, 8, "sets")
    selector = OnlinePMPO(accept_fraction=0.5, reject_fraction=0.125).default_selector()
    assert isinstance(selector, TopBottomSelector)
    assert (selector.accept_fraction, selector.reject_fraction) == (0.5, 0.125)


def test_registration():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    for module in (pmpo, labeled_data, divergences):
        pm.register(module)
    pm.check_pending()
    registry = Registry(pm)
    assert registry.names("objective") == ["online-pmpo", "pmpo"]
    assert registry.names("pair-selector") == ["top-bottom"]
    assert registry.create("objective", "pmpo", {"alpha": 0.9}).alpha == 0.9
    assert registry.create("pair-selector", "top-bottom", {"accept_fraction": 0.5}, reward=None).accept_fraction == 0.5
    installed = load_registry()
    for kind, name in [("objective", "pmpo"), ("objective", "online-pmpo"), ("pair-selector", "top-bottom"), ("dataset", "labeled"), ("dataset", "lmsys")]:
        assert installed.get(kind, name).builtin


# -- the top-bottom selector ---------------------------------------------------------------------


def pool(*rows):
    scores = torch.tensor(rows, dtype=torch.float)
    return CandidatePool([f"prompt {p}" for p in range(len(rows))], [[f"answer {k}" for k in range(len(r))] for r in rows], {"reward": scores})


def test_top_quarter_accepted_and_bottom_quarter_rejected():
    """K = 8, a quarter is 2 samples: rewards 0.8 and 0.7 (k = 2, 5) are the top, 0.0 and 0.1 (k = 7, 0) the bottom."""
    selection = TopBottomSelector().select(pool([0.1, 0.4, 0.8, 0.2, 0.5, 0.7, 0.6, 0.0]))
    assert sorted(selection.accepted) == [(0, 2), (0, 5)]
    assert sorted(selection.rejected) == [(0, 0), (0, 7)]
    assert selection.pairs == []
    assert selection.metrics == {"pools/all_equal": 0.0, "samples/dropped_ties": 0.0}


def test_all_equal_pools_are_skipped_and_counted():
    selection = TopBottomSelector().select(pool([1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]))
    assert selection.accepted == [(1, 1)] and selection.rejected == [(1, 3)]
    assert selection.metrics["pools/all_equal"] == 2.0


def test_a_sample_tied_across_the_boundary_is_neither_accepted_nor_rejected():
    """Halves of [1, 0, 0, 0]: the top two are 1 and a 0, but a 0 ties the worst, so only k=0 is accepted;
    the bottom two (k = 3, 2) are rejected. One sample dropped for a tie.
    [1, 1, 0] with a third each: the best (first of the tied 1s) against the 0; no tie reaches the boundary."""
    selection = TopBottomSelector(0.5, 0.5).select(pool([1.0, 0.0, 0.0, 0.0]))
    assert selection.accepted == [(0, 0)] and sorted(selection.rejected) == [(0, 2), (0, 3)]
    assert selection.metrics["samples/dropped_ties"] == 1.0
    selection = TopBottomSelector(1 / 3, 1 / 3).select(pool([1.0, 1.0, 0.0]))
    assert selection.accepted == [(0, 0)] and selection.rejected == [(0, 2)]


def test_a_rejected_sample_never_ties_an_accepted_one():
    """[2, 1, 1, 0] with three quarters rejected: the bottom three are 0, 1, 1, all below the accepted 2."""
    selection = TopBottomSelector(0.25, 0.75).select(pool([2.0, 1.0, 1.0, 0.0]))
    assert selection.accepted == [(0, 0)] and sorted(selection.rejected) == [(0, 1), (0, 2), (0, 3)]
    # with half accepted the 1s are split: k=1 accepted, k=2 (its tie) not rejected
    selection = TopBottomSelector(0.5, 0.5).select(pool([2.0, 1.0, 1.0, 0.0]))
    assert sorted(selection.accepted) == [(0, 0), (0, 1)] and selection.rejected == [(0, 3)]
    assert selection.metrics["samples/dropped_ties"] == 1.0


def test_small_pools_keep_at_least_one_sample_on_each_side():
    selection = TopBottomSelector(0.25, 0.25).select(pool([0.0, 1.0]))
    assert selection.accepted == [(0, 1)] and selection.rejected == [(0, 0)]


def test_shares_round_halves_up():
    """K = 6: a quarter is 1.5 samples, rounded up to 2 on each side."""
    selection = TopBottomSelector(0.25, 0.25).select(pool([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    assert selection.accepted == [(0, 0), (0, 1)] and selection.rejected == [(0, 5), (0, 4)]


def test_a_zero_fraction_selects_one_side_only():
    selection = TopBottomSelector(accept_fraction=0.0, reject_fraction=0.5).select(pool([3.0, 2.0, 1.0, 0.0]))
    assert selection.accepted == [] and sorted(selection.rejected) == [(0, 2), (0, 3)]
    selection = TopBottomSelector(accept_fraction=0.5, reject_fraction=0.0).select(pool([3.0, 2.0, 1.0, 0.0]))
    assert sorted(selection.accepted) == [(0, 0), (0, 1)] and selection.rejected == []


@pytest.mark.parametrize("options", [{"accept_fraction": -0.1}, {"reject_fraction": 2}, {"accept_fraction": 0, "reject_fraction": 0}])
def test_bad_selector_options_are_errors(options):
    with pytest.raises(PrefError, match="top-bottom"):
        TopBottomSelector(**options)


def test_an_unknown_score_name_is_an_error():
    with pytest.raises(PrefError, match="no score named 'quality'"):
        TopBottomSelector(score="quality").select(pool([0.0, 1.0]))


# -- short runs on the tiny model ----------------------------------------------------------------


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


PMPO_METRICS = {"loss", "logps/accepted", "logps/rejected", "divergence", "rows/accepted", "rows/rejected"}


def test_offline_run_on_labeled_data(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": "Name a fruit.", "completion": "apple", "label": "positive"},
        {"prompt": "Name a fruit.", "completion": "chair", "label": "negative"},
        {"prompt": "What color is the sky?", "completion": "the sky is blue .", "label": True},
        {"prompt": "Name an animal.", "completion": "the table", "label": 0},
    ]
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = {"objective": "pmpo", "dataset": [str(data)], "model": tiny_model_dir, "steps": 2, "batch_size": 2,
             "device": "cpu", "output_dir": str(tmp_path / "run"), "objective_options": {"divergence": "renyi", "renyi_alpha": 2.0}}
    out = train(build_config(flags=flags), load_registry())
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert PMPO_METRICS <= set(metrics)
        assert metrics["rows/accepted"] + metrics["rows/rejected"] == 2
        assert metrics["divergence"] >= -1e-5  # never negative, up to float32 rounding
    assert lines[0]["divergence"] == pytest.approx(0.0, abs=1e-5)  # the first step's policy is the reference
    assert os.path.isdir(os.path.join(out, "final"))


def test_online_run_with_the_noun_reward(tmp_path, tiny_model_dir):
    flags = {"objective": "online-pmpo", "reward": "noun-diversity", "model": tiny_model_dir, "steps": 2, "batch_size": 2,
             "samples_per_prompt": 4, "max_new_tokens": 4, "device": "cpu", "output_dir": str(tmp_path / "run")}
    out = train(build_config(flags=flags), load_registry())
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert PMPO_METRICS | {"pools/all_equal", "samples/dropped_ties", "reward/mean"} <= set(metrics)
        assert metrics["rows/accepted"] + metrics["rows/rejected"] >= 1
