"""The run, resolved once before the model loads: which plugins, which reference, how to sample.

`resolve_plan(config, registry)` turns a `RunConfig` into a `RunPlan`. Every plugin
is built here (so a misspelled name or a bad option fails before anything slow),
the objective's `needs` are read here, and every value the config leaves open
(K, `max_new_tokens`, the reference, the output folder) is settled here. Nothing
below writes back into the config or into a plugin.

Plugin factories get the values of the run they ask for by parameter name, the same way
for every kind (`Registry.create(..., **context)`; the table in docs/plugins.md). A sampler
is built here with its options; its `build(...)` is called once the records are read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pref.checkpoint import PATTERN as CHECKPOINT
from pref.config import DEFAULT_MAX_NEW_TOKENS, RunConfig
from pref.errors import PrefError
from pref.interfaces import (
    MOVING_OPTIONS, NO_REFERENCE, REFERENCE_DISTRIBUTIONS, Adapter, Embedder, Evaluator, Objective, ObjectiveNeeds, PairSelector, Processes, RewardSource, SamplingConfig,
)
from pref.registry import Registry

log = logging.getLogger(__name__)

#: Reference kinds a plan resolves to.
NO_MODEL, FROZEN_MODEL, CACHED_LOGPS = "none", "model", "cached"

#: The logger that shows a progress bar (`plugins/loggers.py`), on unless --no-progress.
PROGRESS = "progress"

#: The default sampler of offline objectives (`plugins/length_buckets.py`).
LENGTH_BUCKETS = "length-buckets"

#: The evaluators on with held-out records and with --test-prompt (`plugins/evaluators.py`).
VALIDATION_LOSS, TEST_PROMPTS, HELD_OUT_REWARD = "validation-loss", "test-prompts", "reward"

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class RunPlan:
    """Everything a run uses besides the model and the data it reads."""

    objective: Objective
    needs: ObjectiveNeeds  # what the objective declared
    reward: RewardSource | None  # online only
    selector: PairSelector | None  # online pairs or sets only
    embedder: Embedder | None  # online only
    sampler: Any  # orders the records: `--sampler` (`--curriculum`), offline "length-buckets"; None: shuffled
    datasets: list[Any]  # a builder per `--dataset` entry
    validation_datasets: list[Any]  # a builder per `--validation-dataset` entry
    reference: str  # NO_MODEL, FROZEN_MODEL or CACHED_LOGPS
    samples_per_prompt: int  # K (online)
    sampling: SamplingConfig | None  # how online samples and evaluators' answers (--test-prompt) are drawn; None: the run samples nothing
    output_dir: str
    adapter: Adapter | None = None  # `--adapter` (`--lora`), trained instead of every weight
    loggers: tuple[str, ...] = ()  # `--logger`'s names, and "progress" unless `--no-progress`
    evaluators: tuple[Evaluator, ...] = ()  # "validation-loss" with held-out records, "test-prompts" with `--test-prompt`, `--evaluator`

    @property
    def batches_per_rollout(self) -> int:
        """Optimizer steps one fresh batch serves: 1, or a rollout's epochs x mini-batches."""
        return self.needs.epochs_per_rollout * self.needs.minibatches_per_rollout


def resolve_plan(config: RunConfig, registry: Registry, processes: Processes | None = None, start_step: int = 0,
                 recorded: dict[str, Any] | None = None) -> RunPlan:
    """Build every plugin of the run and settle what the config leaves open.

    `processes` (the loop's; one process by default) is offered to the objective's factory;
    `start_step` (a resumed run's checkpoint step) to the evaluators'. `recorded`: a resumed
    run's settings as its run.json holds them (`recorded_settings`). A setting the plan refuses
    that holds its recorded value was accepted by the earlier pref that wrote the record: one
    that pref ignored is left out with a warning; one it used makes the run one this version
    cannot resume.
    """
    for kind, name in [*(("reward", name) for name in reward_names(config)), ("pair-selector", config.selector), ("embedder", config.embedder)]:
        if name:
            registry.get(kind, name)  # a misspelled name fails even where the run would not use it
    loggers = (*config.loggers, *([PROGRESS] if config.progress and PROGRESS not in config.loggers else []))
    for name in loggers:  # built after the model load: a missing package (pip install 'pref[wandb]') fails now
        registry.get("logger", name).check_requires()

    if config.quantize and importlib.util.find_spec("bitsandbytes") is None:  # loaded after the data: fail now
        raise PrefError(f"--quantize {config.quantize} needs the bitsandbytes package: pip install 'pref[quantize]'")
    adapter = registry.create("adapter", config.adapter, config.adapter_options) if config.adapter else None
    processes = processes or Processes()
    objective = registry.create("objective", config.objective, config.objective_options, processes=processes,
                                reference_model=config.reference_model)
    needs = objective.needs
    if not isinstance(needs, ObjectiveNeeds):
        raise PrefError(f"objective {config.objective!r} ({registry.get('objective', config.objective).package}): its needs must be "
                        f"a pref.ObjectiveNeeds, not a {type(needs).__name__}")
    datasets = dataset_builders(config.dataset, config, registry, needs)
    validation_datasets = dataset_builders(config.validation_dataset, config, registry, needs, flag="--validation-dataset")
    if not needs.online and not config.dataset:
        raise PrefError(f"objective {config.objective!r} trains on a dataset: pass --dataset FILE")

    output_dir = output_folder(config)
    for refusal in refusals(config, needs, adapter):
        settings = {key: as_recorded(getattr(config, key)) for key in refusal.settings}
        if recorded is None or any(key not in recorded or as_recorded(recorded[key]) != value for key, value in settings.items()):
            raise PrefError(f"{refusal.why}: {refusal.fix}")
        # the run's own record holds it: an earlier pref accepted it, and the run cannot drop it now as its user could
        held = ", ".join(f"{key} {json.dumps(value)}" for key, value in settings.items())
        if refusal.back_then is not None:
            raise PrefError(f"cannot resume {output_dir} with this version of pref: its run.json records {held}, which this version "
                            f"refuses ({refusal.why}; earlier versions {refusal.back_then}); start a new run with --output-dir NEW")
        if processes.rank == 0:
            log.warning(f"{os.path.join(output_dir, 'run.json')} records {held}, which the earlier pref that wrote it ignored and this "
                        f"one refuses ({refusal.why}): resuming without it")
        config = dataclasses.replace(config, **{key: getattr(RunConfig(), key) for key in settings})

    reward = selector = embedder = None
    if needs.online:
        if config.temperature == 0:
            why = ("samples several answers per prompt, and at --temperature 0 (greedy) they are all the same"
                   if (config.samples_per_prompt or needs.samples_per_prompt) > 1 else
                   "learns from answers sampled from the policy's distribution, which greedy decoding (--temperature 0) does not give")
            raise PrefError(f"{config.objective} {why}: pass a temperature above 0 (1.0 is the default)")
        k = config.samples_per_prompt or needs.samples_per_prompt
        if k < 2 and (needs.grouped or needs.uses_selector):
            raise PrefError(f"{config.objective} compares the samples of each prompt with each other: pass --samples-per-prompt 2 or more "
                            f"(got {k})")
        # an objective that needs no reward (distill) only logs the one it is given
        reward = resolve_reward(config, registry, objective) if needs.scored or config.reward else None
        if not config.dataset and needs.columns:  # default prompts have no other columns
            raise PrefError(f"objective {config.objective!r} reads the column {', '.join(map(repr, needs.columns))} of each prompt's row: "
                            "pass --dataset with such rows")
        if not config.dataset and reward is None:
            raise PrefError(f"objective {config.objective!r} samples answers to prompts it is given: pass --dataset with prompts")
        if not config.dataset and not reward.default_prompts:
            raise PrefError(f"the reward {' + '.join(reward_names(config)) or type(reward).__name__} has no default prompts: pass --dataset with prompts")
        if config.embedder:
            embedder = registry.create("embedder", config.embedder, config.embedder_options)
        if needs.uses_selector:
            if config.selector:
                selector = registry.create("pair-selector", config.selector, config.selector_options,
                                           embedder=embedder, reward=reward)
            else:
                selector = objective.default_selector(embedder=embedder, reward=reward)
            if selector is None:
                raise PrefError(f"objective {config.objective!r} has no pair selector of its own: pass --selector NAME (see `pref list-plugins`)")

    sampler_name, sampler_options = ("curriculum", config.curriculum_options) if config.curriculum else (config.sampler, config.sampler_options)
    if not sampler_name and not needs.online and config.bucket_window != 0:  # rows of similar length share a batch: less padding
        sampler_name, sampler_options = LENGTH_BUCKETS, {"window": setting(config, "bucket_window")}
    sampler = registry.create("sampler", sampler_name, sampler_options) if sampler_name else None

    # the reward knows how long its answers are; offline, only evaluators' answers are sampled
    max_new_tokens = config.max_new_tokens or (reward.max_new_tokens if reward is not None else None) or DEFAULT_MAX_NEW_TOKENS
    sampling = SamplingConfig(max_new_tokens, *(setting(config, key) for key in ("temperature", "top_p", "top_k", "min_p"))) if draws_answers(config, needs) else None
    evaluators = {VALIDATION_LOSS: {}} if config.validation_split or config.validation_dataset else {}
    if evaluators and reward is not None:  # online: the run's reward on answers to the held-out prompts too
        evaluators[HELD_OUT_REWARD] = {}
    if config.test_prompts:
        evaluators[TEST_PROMPTS] = {"prompts": list(config.test_prompts)}
    if config.evaluator:
        evaluators[config.evaluator] = {**evaluators.get(config.evaluator, {}), **config.evaluator_options}
    context = {"objective": objective, "processes": processes, "output_dir": output_dir, "batch_size": config.batch_size,
               "sampling": sampling, "start_step": start_step, "run_reward": reward}
    return RunPlan(
        objective=objective,
        needs=needs,
        reward=reward,
        selector=selector,
        embedder=embedder,
        sampler=sampler,
        datasets=datasets,
        validation_datasets=validation_datasets,
        reference=reference_kind(config.reference, needs),
        samples_per_prompt=(config.samples_per_prompt if needs.online and config.samples_per_prompt else needs.samples_per_prompt),
        sampling=sampling,
        output_dir=output_dir,
        adapter=adapter,
        loggers=loggers,
        evaluators=tuple(registry.create("evaluator", name, options, **context) for name, options in evaluators.items()),
    )


@dataclass(frozen=True)
class Refusal:
    """A setting (or a combination) the plan refuses for this objective: `why: fix` is the error for a user who gave it.

    For a run recorded by an earlier pref, which accepted it: `back_then` says what it did there,
    or is None where that pref ignored it (the run trained as if it were not there)."""

    settings: tuple[str, ...]  # the RunConfig fields it is about
    why: str
    fix: str
    back_then: str | None = None


def refusals(config: RunConfig, needs: ObjectiveNeeds, adapter: Adapter | None) -> list[Refusal]:
    """The settings of `config` that objective `config.objective`, with these `needs`, refuses (the first is the error)."""
    name, found = config.objective, []
    if adapter is not None and needs.moves_reference:
        found.append(Refusal(("adapter", "objective_options"),
                             f"{name}'s options move the reference towards the policy ({MOVING_OPTIONS}), but an adapter run's "
                             "reference is its base model with the adapter off, which cannot move", "drop --lora (--adapter) or the option",
                             back_then="failed at the reference's first sync"))
    takes_reward = needs.online and not needs.own_reward
    how = "learns from every sample it draws" if needs.online else "trains on a dataset"
    answers_drawn = draws_answers(config, needs)
    answers_sampled = needs.online or bool(config.evaluator)  # --test-prompt's answers are greedy: only their length is set
    # a setting that would change nothing is a mistake to point out, not to ignore (earlier versions ignored these)
    for flag, setting, used in [("--reward", "reward", takes_reward), ("--reward-option", "reward_options", takes_reward),
                                ("--selector", "selector", needs.uses_selector), ("--embedder", "embedder", needs.uses_selector),
                                ("--samples-per-prompt", "samples_per_prompt", needs.online), ("--max-new-tokens", "max_new_tokens", answers_drawn),
                                ("--temperature", "temperature", answers_sampled), ("--top-p", "top_p", answers_sampled),
                                ("--top-k", "top_k", answers_sampled), ("--min-p", "min_p", answers_sampled),
                                ("--sample-sharded", "sample_sharded", answers_drawn),
                                ("--bucket-window", "bucket_window", not (needs.online or config.curriculum or config.sampler))]:
        if (was_given(config, setting) if setting in PLAN_DEFAULTS else getattr(config, setting)) and not used:
            if needs.own_reward and setting.startswith("reward"):
                why = f"objective {name!r} brings its own reward, set by its options (-o KEY=VALUE)"
            elif setting == "bucket_window" and not needs.online:
                why = f"{'--curriculum' if config.curriculum else f'--sampler {config.sampler}'} orders the records instead of the length buckets"
            else:
                what = f"uses no {flag.removeprefix('--').removesuffix('-option')}"
                if flag in SAMPLING_FLAGS:
                    what = "answers --test-prompt greedily" if config.test_prompts else "samples nothing"
                elif setting == "bucket_window":
                    what = "batches no dataset rows by length"
                why = f"objective {name!r} {how} and {what}"
            found.append(Refusal((setting,), why, f"drop {flag}"))
    # a plugin's options without the plugin (an objective's own selector takes its options as the objective's)
    for plugin, fix in [("selector", "add --selector NAME, or give the objective's own selector its options with -o KEY=VALUE"),
                        ("embedder", "add --embedder NAME")]:
        if getattr(config, f"{plugin}_options") and not getattr(config, plugin):
            found.append(Refusal((f"{plugin}_options",), f"{plugin} options were given without --{plugin}", fix))
    if config.log_completions and not needs.online:
        found.append(Refusal(("log_completions",), f"objective {name!r} {how} and samples nothing: there are no completions to log",
                             "drop --log-completions"))
    if config.sample_sharded and not config.fsdp:
        found.append(Refusal(("sample_sharded",), "--sample-sharded samples through the model --fsdp shards, and this run shards none",
                             "add --fsdp, or drop --sample-sharded"))
    if needs.moves_reference and config.reference == "none":
        found.append(Refusal(("reference", "objective_options"), f"{name}'s options move the reference towards the policy ({MOVING_OPTIONS}), "
                             "but --reference none trains without one", "drop --reference none or the option",
                             back_then="trained reference-free, the option doing nothing"))
    elif needs.reference == NO_REFERENCE and config.reference in ("model", "cached"):
        found.append(Refusal(("reference",), f"objective {name!r} uses no reference", f"drop --reference {config.reference}"))
    elif needs.reference != NO_REFERENCE and config.reference == "none" and not needs.reference_optional:
        # found only at the first loss otherwise, after the model load (and an online run's first samples, A*-PO's starting ones)
        found.append(Refusal(("reference",), f"objective {name!r} with these options compares the policy with a reference model",
                             "drop --reference none (or the objective's option that uses the reference, such as its KL weight beta)",
                             back_then="failed at the run's first loss"))
    elif config.reference == "cached" and (needs.online or needs.scores_new_rows or needs.reference == REFERENCE_DISTRIBUTIONS):
        # found only at the first loss otherwise, after the model load and the cache's precompute
        found.append(Refusal(("reference",),
                             f"--reference cached keeps only the summed log-probs of the dataset's rows, and objective {name!r} with these options "
                             "needs more (its own samples, other pairings, per-token log-probs or a moving reference)",
                             "use --reference model (or auto)", back_then="failed at the run's first loss"))
    if config.reference_model and (needs.reference == NO_REFERENCE or config.reference == "none"):
        why = "--reference none trains without a reference" if config.reference == "none" else f"objective {name!r} with these options uses no reference"
        found.append(Refusal(("reference_model",), why, "drop --reference-model"))
    elif config.reference_model and needs.moves_reference:
        found.append(Refusal(("reference_model", "objective_options"), f"{name}'s options move the reference towards the policy ({MOVING_OPTIONS}), "
                             "which starts as the policy's own weights, not --reference-model's", "drop --reference-model or the option"))
    return found


def output_folder(config: RunConfig) -> str:
    """Where the run writes: `--output-dir`, a resumed run's own folder, or runs/OBJECTIVE-TIMESTAMP."""
    resumed = os.path.normpath(config.resume) if config.resume else None  # it goes on in its run folder, where its record is checked
    resumed = os.path.dirname(resumed) if resumed and CHECKPOINT.match(os.path.basename(resumed)) else resumed
    return config.output_dir or resumed or os.path.join("runs", f"{config.objective}-{time.strftime('%Y%m%d-%H%M%S')}")


def as_recorded(value: Any) -> Any:
    """`value` as run.json holds it (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


#: The flags of sampling, refused by a run that samples nothing (an offline one without evaluators).
SAMPLING_FLAGS = ("--samples-per-prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--sample-sharded")
#: What the plan makes of these settings left at None (bucket_window offline; max_new_tokens where the reward has no length of
#: its own). run.json recorded these values until the settings defaulted to None: a resume of such a run carries them unasked.
PLAN_DEFAULTS = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "bucket_window": 50}


def draws_answers(config: RunConfig, needs: ObjectiveNeeds) -> bool:
    """Whether the run draws answers from the policy: online, or offline only for its evaluators (--test-prompt, --evaluator)."""
    return needs.online or bool(config.test_prompts or config.evaluator)


def was_given(config: RunConfig, key: str) -> bool:
    """Whether the user set `key`, not counting a value an older run.json recorded by default."""
    value = getattr(config, key)
    return value is not None and not (config.resume and value == PLAN_DEFAULTS[key])


def setting(config: RunConfig, key: str) -> Any:
    """The value of `key` the run uses: the config's, or the plan's default."""
    value = getattr(config, key)
    return PLAN_DEFAULTS[key] if value is None else value


def resolve_reward(config: RunConfig, registry: Registry, objective: Objective) -> RewardSource:
    """The reward of an online run: the objective's own, `--reward`, or the objective's default."""
    if objective.needs.own_reward:
        reward = objective.own_reward()
        if reward is None:
            raise PrefError(f"objective {config.objective!r} declares a reward of its own but gave none")
        return reward
    names = reward_names(config) or ([objective.needs.reward] if objective.needs.reward else [])
    if not names:
        raise PrefError(f"objective {config.objective!r} samples online and needs a reward: pass --reward NAME (see `pref list-plugins`)")
    if len(names) == 1:
        return registry.create("reward", names[0], config.reward_options)
    # several: the `weighted` reward's sum, whose parts' scores are logged as NAME/SCORE (rewards/NAME/mean);
    # each option names its reward (`NAME.key`), and the weighted reward hands it on
    weights = config.reward_weights or [1.0] * len(names)
    return registry.create("reward", WEIGHTED_REWARD, {"rewards": dict(zip(names, weights)), "options": config.reward_options})


#: The reward plugin that sums several rewards (`plugins/weighted_reward.py`).
WEIGHTED_REWARD = "weighted"


def reward_names(config: RunConfig) -> list[str]:
    """The rewards the run names: none, one or several."""
    if not config.reward:
        return []
    return [config.reward] if isinstance(config.reward, str) else list(config.reward)


def reference_kind(asked: str, needs: ObjectiveNeeds) -> str:
    """What `--reference` (auto, model, cached, none) gives for these needs.

    auto caches the dataset's log-probs when the objective only ever scores dataset rows
    and needs no full distributions; otherwise it keeps a frozen copy of the model.
    """
    if needs.reference == NO_REFERENCE or asked == "none":
        return NO_MODEL
    if asked == "model":
        return FROZEN_MODEL
    if asked == "cached":
        return CACHED_LOGPS
    if needs.online or needs.scores_new_rows or needs.reference == REFERENCE_DISTRIBUTIONS:
        return FROZEN_MODEL
    return CACHED_LOGPS


def dataset_builders(entries: list[str], config: RunConfig, registry: Registry, needs: ObjectiveNeeds, flag: str = "--dataset") -> list[Any]:
    """A builder per dataset entry: a registered builder's name, or a path/hub name for the
    objective's default builder (`text` for a .txt file). `flag` names the entries in errors."""
    builders = []
    for entry in entries:
        if entry in registry.names("dataset"):
            builders.append(registry.create("dataset", entry, config.dataset_options))
            continue
        # "prefs.jsonl" or "./prefs" is clearly meant as a local file; "org/name" may be a hub dataset
        meant_as_file = entry.startswith((".", "/", "~")) or os.path.splitext(entry)[1].lower() in DATA_FILE_SUFFIXES
        if meant_as_file and not os.path.exists(os.path.expanduser(entry)):
            builder_names = ", ".join(registry.names("dataset"))
            raise PrefError(f"{flag} {entry}: no such file or folder (nor a dataset builder: {builder_names})")
        builder = "text" if entry.lower().endswith(".txt") else needs.dataset_builder
        builders.append(registry.create("dataset", builder, {**config.dataset_options, "path": entry}))
    return builders
