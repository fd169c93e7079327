"""The run plan: the reference each objective's needs and `--reference` give, K and max_new_tokens
resolved once without touching the config, and a reference-cache miss that names cause and fix."""

import os

import pytest
import torch

from pref.config import DEFAULT_MAX_NEW_TOKENS, build_config
from pref.errors import PrefError
from pref.interfaces import ObjectiveNeeds
from pref.plan import CACHED_LOGPS, FROZEN_MODEL, NO_MODEL, reference_kind, resolve_plan
from pref.reference import CachedReference
from pref.registry import load_registry
from pref.sequences import Sequences


@pytest.mark.parametrize(
    "needs, asked, expected",
    [
        (ObjectiveNeeds(), "auto", CACHED_LOGPS),  # offline, dataset rows only: cached
        (ObjectiveNeeds(scores_new_rows=True), "auto", FROZEN_MODEL),  # rows outside the dataset: never a cache
        (ObjectiveNeeds(reference="distributions", data="sets"), "auto", FROZEN_MODEL),
        (ObjectiveNeeds(online=True), "auto", FROZEN_MODEL),
        (ObjectiveNeeds(reference="none"), "model", NO_MODEL),
        (ObjectiveNeeds(), "none", NO_MODEL),
        (ObjectiveNeeds(), "model", FROZEN_MODEL),
    ],
)
def test_reference_kind(needs, asked, expected):
    assert reference_kind(asked, needs) == expected


def test_needs_are_checked_when_declared():
    with pytest.raises(PrefError, match="online only"):
        ObjectiveNeeds(data="samples")
    with pytest.raises(PrefError, match="reference"):
        ObjectiveNeeds(reference="cached")


def test_the_plan_resolves_k_and_max_new_tokens_without_writing_into_the_config():
    registry = load_registry()
    config = build_config(flags={"objective": "divpo"})
    plan = resolve_plan(config, registry)
    assert (plan.samples_per_prompt, plan.sampling.max_new_tokens) == (8, plan.reward.max_new_tokens)  # the objective's K, the reward's length
    assert type(plan.reward).__name__ == "NounDiversityReward" and plan.reference == FROZEN_MODEL
    assert config.max_new_tokens is None and config.samples_per_prompt is None and config.output_dir is None
    plan = resolve_plan(build_config(flags={"objective": "divpo", "samples_per_prompt": 4, "max_new_tokens": 3}), registry)
    assert (plan.samples_per_prompt, plan.sampling.max_new_tokens) == (4, 3)
    assert plan.objective.needs.samples_per_prompt == 8  # the objective itself is left as it was


def test_an_offline_objective_without_data_fails_before_the_model_loads(prefs_file):
    with pytest.raises(PrefError, match="pass --dataset FILE"):
        resolve_plan(build_config(flags={"objective": "dpo"}), load_registry())
    plan = resolve_plan(build_config(flags={"objective": "dpo", "dataset": [prefs_file]}), load_registry())
    assert plan.reward is None and plan.selector is None and plan.sampling.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


@pytest.mark.parametrize("objective, flags, message", [
    ("dpo", {"reward": "noun-diversity"}, "objective 'dpo' trains on a dataset and uses no reward: drop --reward"),
    ("dpo", {"selector": "best-vs-worst"}, "uses no selector: drop --selector"),
    ("grpo", {"selector": "best-vs-worst"}, "objective 'grpo' learns from every sample it draws and uses no selector: drop --selector"),
    ("grpo", {"embedder": "wordnet"}, "uses no embedder: drop --embedder"),
    ("dpo", {"samples_per_prompt": 4}, "objective 'dpo' trains on a dataset and samples nothing: drop --samples-per-prompt"),
    ("orpo", {"reference": "model"}, "objective 'orpo' uses no reference: drop --reference model"),
    ("online-dpo", {"reference": "cached", "reward": "noun-diversity"}, "objective 'online-dpo' with these options needs more .* use --reference model"),
    ("kto", {"reference": "cached"}, "objective 'kto' with these options needs more .* use --reference model"),
    ("dpo", {"reference": "cached", "objective_options": {"sync_ref_model": True}}, "needs more .*a moving reference.*--reference model"),
])
def test_a_setting_the_objective_would_not_use_is_refused(prefs_file, objective, flags, message):
    config = build_config(flags={"objective": objective, "dataset": [prefs_file], **flags})
    with pytest.raises(PrefError, match=message):
        resolve_plan(config, load_registry())


def test_a_resumed_run_recorded_with_a_setting_an_earlier_pref_ignored_resumes_without_it(prefs_file, caplog):
    registry = load_registry()
    old = {"objective": "dpo", "dataset": [prefs_file], "samples_per_prompt": 4, "reward_options": {"min_zipf": 3}, "resume": "runs/old"}
    config = build_config(flags=old)
    plan = resolve_plan(config, registry, recorded=config.to_dict())
    assert plan.samples_per_prompt == plan.needs.samples_per_prompt and plan.reward is None
    assert config.samples_per_prompt == 4  # the record keeps what the run was started with
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{os.path.join('runs', 'old', 'run.json')} records {key}, which the earlier pref that wrote it ignored and this one "
                        f"refuses (objective 'dpo' trains on a dataset and {what}): resuming without it"
                        for key, what in [('reward_options {"min_zipf": 3}', "uses no reward"), ("samples_per_prompt 4", "samples nothing")]]
    # given anew (not the recorded value), it is the user's to drop
    with pytest.raises(PrefError, match="samples nothing: drop --samples-per-prompt"):
        resolve_plan(build_config(flags={**old, "samples_per_prompt": 2}), registry, recorded=config.to_dict())
    # online without a reference: the recorded --reference cached and --embedder were ignored too; nothing is built for them
    config = build_config(flags={"objective": "grpo", "reward": "repetition", "reference": "cached", "embedder": "wordnet",
                                 "resume": "runs/old"})
    plan = resolve_plan(config, registry, recorded=config.to_dict())
    assert plan.reference == NO_MODEL and plan.embedder is None


@pytest.mark.parametrize("flags, message", [
    ({"objective": "online-dpo", "reward": "noun-diversity", "reference": "cached"},
     r'records reference "cached", which this version refuses \(--reference cached keeps only the summed log-probs of the dataset\'s rows, '
     r"and objective 'online-dpo' .*; earlier versions failed at the run's first loss\); start a new run with --output-dir NEW$"),
    ({"objective": "dpo", "adapter": "lora", "objective_options": {"sync_ref_model": True}},
     r'records adapter "lora", objective_options \{"sync_ref_model": true\}, which this version refuses \(.*cannot move; earlier versions '
     r"failed at the reference's first sync\); start a new run with --output-dir NEW$"),
])
def test_a_resumed_run_recorded_with_a_setting_an_earlier_pref_used_is_one_it_cannot_resume(prefs_file, flags, message):
    config = build_config(flags={"dataset": [prefs_file], **flags, "resume": "runs/old/checkpoint-000002"})
    with pytest.raises(PrefError, match=f"^cannot resume {os.path.join('runs', 'old')} with this version of pref: its run.json {message}"):
        resolve_plan(config, load_registry(), recorded=config.to_dict())


def test_a_cache_miss_names_the_cause_and_the_fix():
    row = Sequences(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(PrefError, match=r"not in the dataset; declare ObjectiveNeeds\(scores_new_rows=True\).*--reference model"):
        CachedReference({}).logps(row)
