"""References that move: BEMA's (`-o bema_reference=true`, dpo) by hand, against TRL's own callback and from the CLI; TRL's sync_ref_model on kto, grpo and rloo."""

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close

from pref.cli.main import cli
from pref.errors import PrefError
from pref.plugins.moving_reference import BEMA
from pref.plugins.dpo import DPO
from pref.reference import FrozenReference


def one_weight(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(value)
    return model


def test_bema_by_hand():
    """lag 1, multiplier 1, both powers 1: beta_t = alpha_t = 1 / (1 + t). theta_0 = 0.

    step 1, theta 4: ema = 0.5 * 0 + 0.5 * 4 = 2, averaged = 2 + 0.5 * (4 - 0) = 4
    step 2, theta 6: ema = 2/3 * 2 + 1/3 * 6 = 10/3, averaged = 10/3 + 1/3 * 6 = 16/3; the reference takes it (every 2nd step)
    """
    policy, reference = one_weight(0.0), one_weight(0.0)
    objective = DPO(bema_reference=True, bema_lag=1, bema_ema_power=1, bema_bias_power=1, bema_update_freq=1, ref_model_update_freq=2)
    assert objective.needs.moves_reference and objective.needs.reference == "distributions"
    objective.setup(SimpleNamespace(model=policy))
    assert set(objective.reference_state(reference)) == {"theta0/weight", "ema/weight", "averaged/weight"}
    policy.weight.data.fill_(4.0)
    objective.after_step(1, SimpleNamespace(model=policy), FrozenReference(reference))
    assert objective.moving.ema["weight"].item() == pytest.approx(2.0) and objective.moving.averaged["weight"].item() == pytest.approx(4.0)
    assert reference.weight.item() == 0.0  # not a step of the reference's
    policy.weight.data.fill_(6.0)
    objective.after_step(2, SimpleNamespace(model=policy), FrozenReference(reference))
    assert objective.moving.ema["weight"].item() == pytest.approx(10 / 3)
    assert reference.weight.item() == pytest.approx(16 / 3)


def test_bema_snapshots_the_start_at_update_after():
    """update_after 2: step 1 changes nothing, step 2 takes theta_0 = ema = theta_2, step 3 averages from there."""
    policy, reference = one_weight(1.0), one_weight(1.0)
    bema = BEMA(update_freq=1, update_after=2, lag=1, ema_power=1, bias_power=1, ref_model_update_freq=1, ref_model_update_after=3)
    bema.setup(policy)
    bema.state(reference)
    policy.weight.data.fill_(5.0)
    bema.after_step(1, policy, reference)
    assert bema.theta0["weight"].item() == 1.0 and reference.weight.item() == 1.0
    bema.after_step(2, policy, reference)
    assert bema.theta0["weight"].item() == 5.0 and bema.ema["weight"].item() == 5.0 and reference.weight.item() == 1.0
    policy.weight.data.fill_(9.0)  # step 3: beta = alpha = 1/4; ema = 3/4 * 5 + 1/4 * 9 = 6, averaged = 6 + 1/4 * (9 - 5) = 7
    bema.after_step(3, policy, reference)
    assert reference.weight.item() == pytest.approx(7.0)


@pytest.mark.parametrize("options", [
    {},  # TRL's defaults but every step: update_after 0 keeps the starting weights as theta_0
    {"update_freq": 2, "ema_power": 0.6, "bias_power": 0.3, "lag": 2.0, "update_after": 1, "multiplier": 0.5,
     "ref_model_update_freq": 3, "ref_model_update_after": 1},
    {"update_freq": 1, "min_ema_multiplier": 0.4, "ref_model_update_freq": 2},
])
def test_bema_moves_the_reference_as_trls_callback_does(tiny_model_dir, options):
    callback = pytest.importorskip("trl.experimental.bema_for_ref_model").BEMACallback
    from transformers import AutoModelForCausalLM

    options = {"update_freq": 1, "ref_model_update_freq": 1, **options}
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # every weight trains: TRL pairs its trained weights with all of the model's by position, so a frozen one misaligns them
    ours, theirs = copy.deepcopy(policy), copy.deepcopy(policy)
    bema = BEMA(**options)
    bema.setup(policy)
    bema.state(ours)
    trl = callback(**options, update_ref_model=True)
    trl.on_train_begin(None, None, None, model=policy)
    for step in range(1, 8):
        with torch.no_grad():
            for weight in policy.parameters():
                if weight.requires_grad:
                    weight.add_(0.01 * torch.randn_like(weight))  # an optimizer step
        bema.after_step(step, policy, ours)
        trl.on_step_end(None, SimpleNamespace(global_step=step), None, model=policy, ref_model=theirs)
        for (name, mine), expected in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(mine, expected, msg=f"{name} at step {step}")
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), policy.parameters()))


def test_bema_options_are_checked():
    with pytest.raises(PrefError, match="bema_update_freq and ref_model_update_freq must be at least 1"):
        DPO(bema_reference=True, ref_model_update_freq=0)
    with pytest.raises(PrefError, match="bema_lag must be positive"):
        DPO(bema_reference=True, bema_lag=0)
    with pytest.raises(PrefError, match="sync_ref_model and bema_reference both move the reference: choose one"):
        DPO(bema_reference=True, sync_ref_model=True)
    with pytest.raises(PrefError, match="drop reference_free or them"):
        DPO(bema_reference=True, reference_free=True)


def test_bema_trains_from_the_cli(tmp_path, tiny_model_dir, prefs_file):
    """With the reference moved to the policy's average after step 1, step 2's rewards are measured from it, not the start."""
    def run(out, *options):
        result = CliRunner().invoke(cli, ["run", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", str(out), "--objective", "dpo",
                                          "--dataset", prefs_file, "--steps", "2", "--batch-size", "2", "--lr", "1e-3", *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]

    still = run(tmp_path / "dpo")
    moved = run(tmp_path / "bema", "-o", "bema_reference=true", "-o", "bema_update_freq=1", "-o", "ref_model_update_freq=1")
    assert moved[0]["loss"] == pytest.approx(still[0]["loss"])  # step 1 uses the starting reference in both
    assert moved[1]["rewards/chosen"] != pytest.approx(still[1]["rewards/chosen"], abs=1e-6)
    assert json.load(open(tmp_path / "bema" / "run.json"))["config"]["objective_options"]["bema_reference"] is True


# -- TRL's sync_ref_model on KTO, GRPO and RLOO, as on DPO -----------------------------------------------------------------


@pytest.mark.parametrize("name, options", [("kto", {}), ("grpo", {"beta": 0.04}), ("rloo", {})])
def test_sync_ref_model_moves_the_frozen_reference_of_kto_grpo_and_rloo(name, options):
    """ref_model_sync_steps 2, alpha 0.5: unchanged after step 1; after step 2 halfway to the policy (0 -> 2 with policy 4)."""
    from pref.registry import load_registry

    registry = load_registry()
    objective = registry.create("objective", name, {**options, "sync_ref_model": True, "ref_model_mixup_alpha": 0.5,
                                                    "ref_model_sync_steps": 2}, registry=registry)
    assert objective.needs.moves_reference and objective.needs.reference == "distributions"  # a frozen model, never a cache
    policy, reference = SimpleNamespace(model=one_weight(4.0)), one_weight(0.0)
    objective.setup(policy)
    assert objective.reference_state(reference) == {}
    objective.after_step(1, policy, FrozenReference(reference))
    assert reference.weight.item() == 0.0
    objective.after_step(2, policy, FrozenReference(reference))
    assert reference.weight.item() == pytest.approx(2.0)
    assert not registry.create("objective", name, options, registry=registry).needs.moves_reference


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_sync_ref_model_without_a_kl_term_is_a_one_line_error(name):
    result = CliRunner().invoke(cli, ["run", "--objective", name, "--beta", "0", "-o", "sync_ref_model=true"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: {name}: sync_ref_model moves the reference of the KL term, which beta 0 leaves out: "
                                     "set beta > 0, or drop it")


@pytest.mark.parametrize("name, args, figure", [
    ("kto", ["--dataset", "PREFS"], "rewards/chosen"),
    ("grpo", ["--beta", "0.04", "--reward", "noun-diversity", "-k", "2", "--max-new-tokens", "6"], "kl"),
    ("rloo", ["--reward", "noun-diversity", "-k", "2", "--max-new-tokens", "6"], "kl"),
])
def test_sync_ref_model_trains_kto_grpo_and_rloo_from_the_cli(tmp_path, tiny_model_dir, prefs_file, name, args, figure):
    """alpha 1 copies the policy into the reference after step 1: step 2 measures its rewards (KL) from the policy itself, 0."""
    def run(out, *options):
        result = CliRunner().invoke(cli, ["run", "--model", tiny_model_dir, "--device", "cpu", "--output-dir", str(out), "--objective", name,
                                          *[prefs_file if a == "PREFS" else a for a in args], "--steps", "2", "--batch-size", "2",
                                          "--lr", "1e-2", *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]

    still = run(tmp_path / "still")
    moved = run(tmp_path / "moved", "-o", "sync_ref_model=true", "-o", "ref_model_sync_steps=1", "-o", "ref_model_mixup_alpha=1.0")
    assert moved[0][figure] == pytest.approx(still[0][figure])
    assert moved[1][figure] == pytest.approx(0.0, abs=1e-6) and abs(still[1][figure]) > 1e-5
