"""The run plan: the reference each objective's needs and `--reference` give, K and max_new_tokens
resolved once without touching the config, and a reference-cache miss that names cause and fix."""

import os

import pytest
import torch

from pref.config import DEFAULT_MAX_NEW_TOKENS, build_config
from pref.errors import PrefError
from pref.interfaces import ObjectiveNeeds, SamplingConfig
from pref.plan import CACHED_LOGPS, FROZEN_MODEL, NO_MODEL, PLAN_DEFAULTS, reference_kind, resolve_plan
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
    assert plan.reward is None and plan.selector is None and plan.sampling is None  # nothing is sampled
    plan = resolve_plan(build_config(flags={"objective": "dpo", "dataset": [prefs_file], "test_prompts": ["Hi."]}), load_registry())
    assert plan.sampling.max_new_tokens == DEFAULT_MAX_NEW_TOKENS  # the test prompts' answers


@pytest.mark.parametrize("objective, flags, message", [
    ("dpo", {"reward": "noun-diversity"}, "objective 'dpo' trains on a dataset and uses no reward: drop --reward"),
    ("dpo", {"selector": "best-vs-worst"}, "uses no selector: drop --selector"),
    ("grpo", {"selector": "best-vs-worst"}, "objective 'grpo' learns from every sample it draws and uses no selector: drop --selector"),
    ("grpo", {"embedder": "wordnet"}, "uses no embedder: drop --embedder"),
    ("dpo", {"samples_per_prompt": 4}, "objective 'dpo' trains on a dataset and samples nothing: drop --samples-per-prompt"),
    ("dpo", {"temperature": 0.7}, "objective 'dpo' trains on a dataset and samples nothing: drop --temperature"),
    ("dpo", {"top_k": 5}, "objective 'dpo' trains on a dataset and samples nothing: drop --top-k"),
    ("dpo", {"min_p": 0.1}, "objective 'dpo' trains on a dataset and samples nothing: drop --min-p"),
    ("a2po", {"reference": "none"}, "^objective 'a2po' with these options compares the policy with a reference model: drop --reference none"),
    ("rloo", {"reference": "none"}, "objective 'rloo' with these options compares the policy with a reference model"),
    ("dpo", {"max_new_tokens": 16}, "objective 'dpo' trains on a dataset and samples nothing: drop --max-new-tokens"),
    ("dpo", {"top_p": 0.9, "test_prompts": ["Hi."]}, "objective 'dpo' trains on a dataset and answers --test-prompt greedily: drop --top-p"),
    ("grpo", {"bucket_window": 10}, "objective 'grpo' learns from every sample it draws and batches no dataset rows by length: drop --bucket-window"),
    ("dpo", {"bucket_window": 0, "sampler": "length-buckets"}, "^--sampler length-buckets orders the records instead of the length buckets: drop"),
    ("dpo", {"sample_sharded": True, "fsdp": True}, "objective 'dpo' trains on a dataset and samples nothing: drop --sample-sharded"),
    ("grpo", {"sample_sharded": True}, "^--sample-sharded samples through the model --fsdp shards, and this run shards none: add --fsdp"),
    ("orpo", {"reference": "model"}, "objective 'orpo' uses no reference: drop --reference model"),
    ("online-dpo", {"reference": "cached", "reward": "noun-diversity"}, "objective 'online-dpo' with these options needs more .* use --reference model"),
    ("kto", {"reference": "cached"}, "objective 'kto' with these options needs more .* use --reference model"),
    ("dpo", {"reference": "cached", "objective_options": {"sync_ref_model": True}}, "needs more .*a moving reference.*--reference model"),
    ("dpo", {"reference": "none", "objective_options": {"bema_reference": True}},
     r"^dpo's options move the reference towards the policy \(sync_ref_model, bema_reference, teacher_model_kind=ema\), but --reference none trains without one: "
     "drop --reference none or the option$"),
    ("online-dpo", {"reference": "none", "reward": "noun-diversity", "objective_options": {"sync_ref_model": True}}, "but --reference none trains"),
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


def test_sampling_and_bucketing_settings_are_taken_where_used_and_a_resume_may_carry_their_old_recorded_defaults(prefs_file):
    registry, dpo = load_registry(), {"objective": "dpo", "dataset": [prefs_file]}
    plan = resolve_plan(build_config(flags={**dpo, "test_prompts": ["Hi."], "max_new_tokens": 16, "bucket_window": 7}), registry)
    assert plan.sampling == SamplingConfig(16, 1.0, 1.0, 0) and plan.sampler.window == 7
    plan = resolve_plan(build_config(flags={"objective": "divpo", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05}), registry)
    assert plan.sampling == SamplingConfig(plan.reward.max_new_tokens, 0.7, 0.9, 5, 0.05)
    # run.json recorded these defaults before they were None: a resume of such a run brings them back unasked
    assert resolve_plan(build_config(flags={**dpo, **PLAN_DEFAULTS, "resume": "runs/old"}), registry).sampling is None
    assert resolve_plan(build_config(flags={"objective": "divpo", **PLAN_DEFAULTS, "resume": "runs/old"}), registry).sampler is None
    with pytest.raises(PrefError, match="drop --temperature"):  # a value the user gave is still refused on a resume
        resolve_plan(build_config(flags={**dpo, "temperature": 0.7, "resume": "runs/old"}), registry)
    config = build_config(flags={**dpo, "temperature": 0.7, "resume": "runs/old"})  # unless its record holds it: an earlier pref ignored it
    assert resolve_plan(config, registry, recorded=config.to_dict()).sampling is None
    with pytest.raises(PrefError, match="drop --bucket-window"):  # a default recorded is one only on a resume
        resolve_plan(build_config(flags={"objective": "divpo", "bucket_window": 50}), registry)


def test_a_config_file_gives_settings_as_flags_do_and_an_old_run_json_resumes(tmp_path, monkeypatch, prefs_file):
    import json

    from click.testing import CliRunner

    import pref.train as train_module
    from pref.cli.main import cli

    planned = []
    monkeypatch.setattr(train_module, "train", lambda config, registry: planned.append(resolve_plan(config, registry)) or str(tmp_path))
    (tmp_path / "run.toml").write_text(f'objective = "dpo"\ndataset = [{json.dumps(prefs_file)}]\ntemperature = 0.7\n')
    result = CliRunner().invoke(cli, ["run", "--config", str(tmp_path / "run.toml")])
    assert result.exit_code == 2 and "trains on a dataset and samples nothing: drop --temperature" in result.stderr
    run = tmp_path / "old-run"  # its run.json as pref wrote it while these settings had fixed defaults
    run.mkdir()
    recorded = {**build_config(flags={"objective": "dpo", "dataset": [prefs_file]}).to_dict(), **PLAN_DEFAULTS, "output_dir": str(run)}
    (run / "run.json").write_text(json.dumps({"config": recorded, "versions": {}, "plugins": []}))
    result = CliRunner().invoke(cli, ["run", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert planned[-1].sampling is None and planned[-1].output_dir == str(run)
    result = CliRunner().invoke(cli, ["run", "--resume", str(run), "--temperature", "0.5"])
    assert result.exit_code == 2 and "drop --temperature" in result.stderr


def test_a_cache_miss_names_the_cause_and_the_fix():
    row = Sequences(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(PrefError, match=r"not in the dataset; declare ObjectiveNeeds\(scores_new_rows=True\).*--reference model"):
        CachedReference({}).logps(row)
