"""The training loop. It knows the five interfaces, not any algorithm.

`train_policy(config, registry)` reads top to bottom: set up the device, build the
plugins (the plan), read the datasets with the tokenizer alone, load the policy,
build the reference and the batches, then loop: get a batch, forward and backward
(accumulated), clip and update, evaluate, log, checkpoint. docs/architecture.md follows it.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import platform
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from importlib import metadata
from typing import Any

import torch

from pref import offload
from pref.agreement import StopRequests, next_batch_together, same_decision
from pref.checkpoint import PATTERN, Trained, list_checkpoints, load_checkpoint, mark_evaluated, read_state, rng_state, save_checkpoint, write_atomically
from pref.config import RunConfig
from pref.data import OfflineBatches, build_datasets, check_records, collate, count_tokens, dataset_names, rows_per_batch, sequences_of, split_datasets
from pref.divergence import check_step, check_weights, refuse_non_finite_settings, sampling_diverged
from pref.errors import NoUsablePairs, PrefError, RunInterrupted
from pref.interfaces import Adapter, LabeledBatch, MetricsLogger, Minibatch, PairBatch, Processes, Reference, SecondModel
from pref.models import DEFAULT_MODEL, SCORE_HEAD, load_model, load_tokenizer, prepare_for_training, quiet_new_heads, quiet_peft, remote_code, turn_off_dropout
from pref.online import SAMPLE_FIELDS, OnlineBatches, require_answers, require_columns, require_scored, sample_pool
from pref.packing import may_pack, packs_correctly
from pref.plan import CACHED_LOGPS, NO_MODEL, RunPlan, output_folder, resolve_plan, reward_names
from pref.policy import HFPolicy, unwrap
from pref.precision import AUTOCAST, head_in_float32, keep_trainable_in_float32, resolve_device, resolve_dtype
from pref.reference import AdaptersOffReference, CachedReference, FrozenReference, cache_dir
from pref.registry import Registry
from pref.reporting.card import write_model_card
from pref.reporting.runs import final_config
from pref.run_folder import (
    FINAL_DIR, RUN_FILE, absolute_paths, claim_output_dir, recorded_settings, release_locks, resume_checkpoint, resumed_record,
)
from pref.sequences import router_loss_coef
from pref.sharding import is_sharded, no_gradient_sync, refuse_unsupported, shard, whole_state_dict

log = logging.getLogger(__name__)

MERGED_DIR = "merged"  # in final/: an adapter run's full weights, with --merge-lora
BEST_DIR, BEST_FILE = "best", "best.json"  # the model of the lowest validation/loss, and its step and value


def make_accelerator(config: RunConfig, dtype: torch.dtype = torch.float32) -> Any:
    """Resolve the device and precision once; nothing below branches on them.

    Weights loaded in a low-precision `dtype` compute under its autocast (their trained
    part is kept in float32, see pref.precision), unless --mixed-precision says otherwise.
    """
    from accelerate import Accelerator

    # accelerate runs several CPU processes as one job only when told cpu=True; "auto"
    # on a machine without a GPU must say so, or each launched process trains alone
    cpu = resolve_device(config.device) == "cpu"
    from accelerate.state import AcceleratorState

    mixed_precision = AUTOCAST.get(dtype, "no") if config.mixed_precision == "no" else config.mixed_precision
    if mixed_precision == "fp16" and cpu:  # accelerate would quietly compute in float32: the flag would change nothing
        raise PrefError("--mixed-precision fp16 does nothing on a CPU (accelerate autocasts fp16 on GPUs only); use --mixed-precision bf16 or no")
    AcceleratorState._reset_state()  # a second run in this process may compute in another precision
    joined_before = is_joined()
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    except ValueError as exc:
        raise PrefError(f"cannot use mixed precision {mixed_precision!r} here: {exc}; use --mixed-precision no and --dtype float32") from None
    if is_joined() and not joined_before:  # pref joined the launched processes: it parts them when the process ends
        atexit.register(lambda: is_joined() and torch.distributed.destroy_process_group())
    return accelerator


def is_joined() -> bool:
    """Whether this process is one of a process group (left to the interpreter's exit, gloo's threads may abort it: exit code -6)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def build_reference(config: RunConfig, plan: RunPlan, policy: HFPolicy, examples: list[Any], processes: Processes, dtype: torch.dtype | None,
                    device: Any) -> Reference | None:
    """Nothing, log-probs cached on disk (the `processes` compute them together), or a frozen model (`plan.reference`): a copy of the
    starting policy, or `--reference-model` loaded in the run's `dtype` onto `device`."""
    if plan.reference == NO_MODEL:
        return None
    other = reference_model(config, policy, dtype, device, plan.needs.own_reference_tokenizer) if config.reference_model else None
    if plan.reference == CACHED_LOGPS:
        batches = [rows for start in range(0, len(examples), config.batch_size)
                   for rows in sequences_of(collate(policy, examples[start : start + config.batch_size]))]
        name = (config.reference_model or config.model or DEFAULT_MODEL) + (" with a float32 LM head" if config.cast_lm_head_to_fp32 else "")  # other log-probs
        with plan.adapter.disabled(unwrap(policy.model)) if plan.adapter and not other else nullcontext():  # an adapter run's reference is its base model
            return CachedReference.build(other or unwrap(policy.model), name, batches, os.path.join(cache_dir(), "reference"),
                                         packing=config.packing, processes=processes)
    if other is not None:
        return FrozenReference(other, config.packing)
    if plan.adapter:
        return AdaptersOffReference(unwrap(policy.model), plan.adapter, config.packing)
    return FrozenReference.copy_of(unwrap(policy.model), config.packing)


def reference_model(config: RunConfig, policy: HFPolicy, dtype: torch.dtype | None, device: Any, own_tokenizer: bool = False) -> torch.nn.Module:
    """`--reference-model`, loaded as the policy was (dtype, attention, 4 bits with --quantize), frozen; a model whose vocabulary is not
    the policy's is a `PrefError` (its log-probs would score other tokens), unless the objective encodes for it (`own_tokenizer`)."""
    name = config.reference_model
    try:
        model = load_model(name, dtype, "causal-lm", config.attn_implementation, config.quantize, device)
    except PrefError as exc:
        raise PrefError(f"--reference-model: {exc}") from None
    try:
        theirs = None if own_tokenizer else load_tokenizer(name).get_vocab()
    except PrefError:  # a folder of weights alone: its output rows are checked
        theirs = None
    ours, rows = policy.tokenizer.get_vocab(), model.get_output_embeddings().weight.shape[0]
    if not own_tokenizer and (theirs not in (None, ours) or rows < len(policy.tokenizer)):
        differ = f"{len(theirs)} tokens against the policy's {len(ours)}" if theirs not in (None, ours) else f"{rows} output rows for {len(ours)} tokens"
        raise PrefError(f"--reference-model {name} has another vocabulary than the policy ({differ}): a reference scores the policy's "
                        "tokens, so it must use the same tokenizer; pass a model of the policy's family")
    if config.cast_lm_head_to_fp32:
        head_in_float32(model)
    return model.to(device).eval().requires_grad_(False)


def build_sampler(config: RunConfig, plan: RunPlan, policy: HFPolicy, example_sets: list[list[Any]], rank: int, world: int, batch_size: int) -> Any:
    """The plan's sampler over the `--dataset` entries (name -> records), `batch_size` per process, its schedule counted in optimizer steps."""
    batches_per_step = float(config.grad_accum) / plan.batches_per_rollout  # a rollout serves several steps
    datasets = dict(zip(dataset_names(config.dataset), example_sets))
    return plan.sampler.build(datasets=datasets, policy=policy, batch_size=batch_size, seed=config.seed, rank=rank, world=world,
                              batches_per_step=batches_per_step)


def build_data(config: RunConfig, plan: RunPlan, policy: HFPolicy, examples: list[Any], rank: int, world: int, order: Any = None,
               after_draw: Any = None, processes: Processes | None = None, *, batch_size: int) -> Any:
    """Offline or online batches of `batch_size` rows or prompts per process; `order` (a sampler) replaces their shuffled order when given.

    `after_draw` is called after each batch (online: each draw of samples): it trains the objective's second model.
    """
    if not plan.needs.online:
        return OfflineBatches(policy, examples, batch_size, config.seed, rank, world, order=order, after_draw=after_draw)
    return OnlineBatches(policy, examples or list(plan.reward.default_prompts if plan.reward else []), plan.reward, plan.selector, plan.needs, plan.samples_per_prompt, plan.sampling,
                         batch_size, config.seed, rank, world, order=order, after_draw=after_draw, processes=processes,
                         sampling_together=config.fsdp)


def start_objective(name: str, plan: RunPlan, policy: HFPolicy, items: list[Any], processes: Processes, batch_size: int,
                    sampling_together: bool) -> list[int]:
    """With `needs.starting_samples`: hand objective `name` the starting policy's samples of each training item's prompt (records,
    or the reward's default prompts), scored (`Objective.start`); returns the indices of the items it leaves out."""
    k = plan.needs.starting_samples
    pool = sample_pool(policy, items, plan.reward, k, plan.sampling, batch_size, processes, sampling_together,
                       f"{k} samples of each prompt (once, before training)")
    if not plan.needs.unscored_samples:
        texts = [c for p, row in zip(pool.prompts, pool.completions) for c in row or [f"<a sample of {str(p)[:40]!r} by another process>"] * k]
        require_scored(pool.scores["reward"], texts, f"objective {name}")
    kept = plan.objective.start(pool)
    if kept is None:
        return []
    if not isinstance(kept, (list, tuple)) or len(kept) != len(items) or not all(isinstance(keep, bool) for keep in kept):
        raise PrefError(f"objective {name}'s start() gave {type(kept).__name__} {str(kept)[:60]}; it must return one bool per prompt "
                        f"of the pool ({len(items)}), or None")
    if not any(kept):
        raise PrefError(f"objective {name} left out every one of the {len(items)} training prompts after sampling each; give other prompts")
    return [i for i, keep in enumerate(kept) if not keep]


def without(example_sets: list[list[Any]], dropped: list[int]) -> list[list[Any]]:
    """Each list of records but those whose index among all of them (the lists one after the other) is in `dropped`."""
    left_out, first, kept = set(dropped), 0, []
    for records in example_sets:
        kept.append([record for i, record in enumerate(records, start=first) if i not in left_out])
        first += len(records)
    return kept


def save_final(policy: HFPolicy, path: str, adapter: Adapter | None = None, merge: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None, unquantized: torch.dtype | None = None, kind: str = "causal-lm") -> None:
    """The trained model into `path` (with an `adapter`: the adapter, and with `merge` also `path/merged/`).

    `state_dict`: the weights to save instead of the model's own (a sharded model's, gathered whole).
    `unquantized`: the base (a `kind` model) was trained in 4 bits; the merge goes into it loaded again in this dtype (4-bit weights
    with the adapter folded in would be rounded to 4 bits again, and plain transformers could not load them).
    """
    policy.save(path, state_dict)
    if adapter and merge:
        model = unwrap(policy.model)
        if unquantized is not None:
            model = load_model(path, unquantized, kind)  # the adapter just saved, on its base
            state_dict = model.state_dict()  # save_merged builds its copy on the meta device from these: no second copy
        with quiet_peft():
            adapter.save_merged(model, policy.tokenizer, os.path.join(path, MERGED_DIR), state_dict)


def make_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine or linear decay to zero (or constant)."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_record(config: RunConfig, plan: RunPlan, registry: Registry) -> dict[str, Any]:
    """The configuration with what the plan resolved, library versions and plugin versions."""
    versions = {"python": platform.python_version()}
    for package in ("pref", "torch", "transformers", "accelerate", "datasets", "safetensors", "pluggy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    plugins = [
        {"kind": i.kind, "name": i.name, "package": i.package, "version": i.version}
        for i in registry.items()
    ]
    resolved = {"output_dir": plan.output_dir}
    if plan.sampling is not None:  # a run that samples nothing (offline, no evaluator) names no answer length in its record or card
        resolved["max_new_tokens"] = plan.sampling.max_new_tokens
    if not config.reward and default_reward(plan):  # named in the card and report
        resolved["reward"] = default_reward(plan)
    return {"config": {**config.to_dict(), **resolved}, "versions": versions, "plugins": plugins}


def default_reward(plan: RunPlan) -> str | None:
    """The reward an online run uses when it names none: its objective's default (None where it brings its own, or is offline)."""
    return plan.needs.reward if plan.reward is not None and not plan.needs.own_reward else None


def read_best(out_dir: str, step: int) -> float:
    """The lowest validation loss of the run up to `step` (its checkpoint's): a resumed run keeps its best/ unless it does better."""
    path = os.path.join(out_dir, BEST_FILE)
    if not os.path.exists(path):
        return math.inf
    with open(path) as f:
        best = json.load(f)
    return best["validation_loss"] if best["step"] <= step else math.inf


def set_aside_steps_after(out_dir: str, step: int) -> None:
    """Move the checkpoints and best/ of steps after `step` into `superseded-after-NNNNNN/`: a run resumed from `step` trains
    them again (maybe with other settings), so a later `--resume RUN` must not take up their checkpoints, nor best/ keep a
    model no longer of the run; they stay on disk for the user to keep or delete."""
    later = [path for path in list_checkpoints(out_dir) if int(PATTERN.match(os.path.basename(path)).group(1)) > step]
    if read_best(out_dir, step) == math.inf:
        later += [path for path in (os.path.join(out_dir, BEST_DIR), os.path.join(out_dir, BEST_FILE)) if os.path.lexists(path)]
    if not later:
        return
    base, count = os.path.join(out_dir, f"superseded-after-{step:06d}-{time.strftime('%Y%m%d-%H%M%S')}"), 1
    aside = base
    while os.path.lexists(aside):  # two resumes within a second
        aside, count = f"{base}-{count}", count + 1
    os.makedirs(aside)
    for path in later:
        os.replace(path, os.path.join(aside, os.path.basename(path)))


def keep_best(policy: HFPolicy, out_dir: str, step: int, loss: float, measure: str, write: bool) -> None:
    """The policy into best/ and its step and loss into best.json, atomically; every process calls it (a sharded model is gathered)."""
    model = unwrap(policy.model)
    weights = whole_state_dict(model) if is_sharded(model) else None
    if not write:
        return
    write_atomically(os.path.join(out_dir, BEST_DIR), lambda path: policy.save(path, weights))

    def write_record(path: str) -> None:
        with open(path, "w") as f:
            json.dump({"step": step, "validation_loss": loss, "measure": measure}, f, indent=2)

    write_atomically(os.path.join(out_dir, BEST_FILE), write_record)


def evaluate_and_keep_best(plan: RunPlan, policy: HFPolicy, reference: Reference | None, validation: list[Any], step: int, best: float,
                           accelerator: Any) -> tuple[dict[str, float], float]:
    """Every evaluator's figures for the policy at `step`, and the lowest validation/loss so far; a new lowest keeps the policy in best/.

    Every process calls it together (a sharded model is gathered, evaluators reduce across processes).
    """
    figures: dict[str, float] = {}
    with accelerator.autocast():
        for evaluator in plan.evaluators:
            figures.update(evaluator.evaluate(step, policy, reference, validation))
    if figures.get("validation/loss", math.inf) < best:
        best = figures["validation/loss"]
        keep_best(policy, plan.output_dir, step, best, "per-token nll" if plan.needs.online else "objective loss", accelerator.is_main_process)
    accelerator.wait_for_everyone()
    return figures, best


class AcceleratedProcesses(Processes):
    """The run's processes through accelerate. Every reduction is a collective call: all processes make it together."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean")

    def gather(self, items: list[Any]) -> list[Any]:
        from accelerate.utils import gather_object

        return list(items) if self.world == 1 else gather_object(list(items))


def combine_reports(reports: list[dict[str, float]]) -> dict[str, float]:
    """Each figure over the reports that hold it (KTO's `rewards/chosen` needs a desirable answer in the batch): the largest for a
    figure named as a maximum (a `max` word in its last part: `reward/max`, `completions/max_length`, `clip_ratio/high_max`), the
    smallest for a minimum, else the mean."""
    combined = {}
    for key in dict.fromkeys(key for report in reports for key in report):
        values = [r[key] for r in reports if key in r]
        words = key.rsplit("/", 1)[-1].split("_")
        combined[key] = max(values) if "max" in words else min(values) if "min" in words else sum(values) / len(values)
    return combined


def combine_across_processes(processes: Processes, metrics: dict[str, float]) -> dict[str, float]:
    """`combine_reports` of every process's `metrics` (a collective call: all processes make it, and get the same figures)."""
    return metrics if processes.world == 1 else combine_reports(processes.gather([metrics]))


def completion_rows(batch: Any) -> list[dict[str, Any]]:
    """The samples an online batch was drawn from as rows (`prompt`, `completion`, the row columns the reward read, each score), for
    `--log-completions`; [] for a dataset's batch, and for a rollout's mini-batches after its first. A row column named as a
    sample's own field (GKD's `completion`: the row's answer) is written as `row/NAME`."""
    fresh = isinstance(batch, Minibatch) and not (batch.epoch or batch.index)
    drawn = batch.rollout.batch if fresh else batch.drawn if isinstance(batch, (PairBatch, LabeledBatch)) else None
    if drawn is None:
        return []
    scores = {name: [None if math.isnan(value) else value for value in values.tolist()] for name, values in drawn.scores.items()}  # None: unscored
    return [{"prompt": prompt, "completion": completion,
             **{f"row/{name}" if name in SAMPLE_FIELDS else name: values[i] for name, values in drawn.columns.items()},
             **{name: values[i] for name, values in scores.items()}} for i, (prompt, completion) in enumerate(zip(drawn.prompts, drawn.completions))]


def checked_loss(name: str, result: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """An objective's `loss()` result; a plugin's mistake in it (not a scalar tensor and a dict of floats) is a `PrefError` naming it."""
    loss, metrics = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not isinstance(metrics, dict):
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) and isinstance(metrics, dict) else f"a {type(result).__name__}"
        raise PrefError(f"objective {name}'s loss() gave {what}; it must return (the scalar loss tensor, a dict of float metrics)")
    for key, value in metrics.items():
        if not isinstance(value, (int, float)):  # a tensor would be kept alive with its graph, and metrics.jsonl could not hold it
            raise PrefError(f"objective {name}'s loss() gave the metric {key!r} as a {type(value).__name__}; metrics must be floats (tensor.item())")
    return loss, metrics


def train_second_model(second: SecondModel, optimizer: torch.optim.Optimizer, processes: Processes, autocast: Any = nullcontext) -> dict[str, float]:
    """One optimizer step on `second.loss(batch)` for each batch `second.batches()` gives now.

    Gradients are averaged across processes. Returns `second.trained(...)`'s figures, or {} when there was nothing to train on.
    """
    steps = []
    was_training = second.model.training
    for batch in second.batches():
        second.model.train()
        with autocast():
            loss, metrics = second.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if processes.world > 1:
            for p in second.model.parameters():
                if p.grad is not None:
                    p.grad = processes.mean(p.grad)
        optimizer.step()
        second.model.train(was_training)
        steps.append(metrics)
    return second.trained(steps) if steps else {}


@contextmanager
def loggers_running(loggers: list[MetricsLogger], total_steps: int, start_step: int) -> Iterator[None]:
    """Each logger's `start` before the loop, and its `stop` after it, also when a step fails (a live display ends)."""
    for logger in loggers:
        logger.start(total_steps, start_step)
    try:
        yield
    finally:
        for logger in loggers:
            logger.stop()


def same_start(module: torch.nn.Module, world: int) -> None:
    """Every process starts `module` from the first one's weights, as DDP does for the policy (each drew its own random init)."""
    if world > 1:
        from accelerate.utils import broadcast

        for tensor in module.state_dict().values():
            tensor.copy_(broadcast(tensor.clone(), from_process=0))


def train(config: RunConfig, registry: Registry) -> str:
    """Run a whole training job; return the output folder."""
    try:
        with remote_code(config.trust_remote_code):  # every model the run loads, plugins' too
            out_dir, _ = train_policy(config, registry)
    finally:
        release_locks()  # a run that failed frees its folder too (a killed one: the system does)
    return out_dir


def train_policy(config: RunConfig, registry: Registry) -> tuple[str, HFPolicy]:
    """Run a whole training job; return the output folder and the trained policy.

    The policy holds this process's copy of the trained model, unwrapped.
    """
    # -- device, precision, seed ------------------------------------------------
    refuse_non_finite_settings(config)
    config = absolute_paths(config, registry.names("dataset"))  # run.json records them, for a resume from anywhere
    dtype = resolve_dtype(config.dtype, config.device, config.model)
    accelerator = make_accelerator(config, dtype)
    from accelerate.utils import set_seed

    set_seed(config.seed + accelerator.process_index)
    if config.threads:
        torch.set_num_threads(config.threads)  # for the whole process, like the seed
    rank, world = accelerator.process_index, accelerator.num_processes
    processes = AcceleratedProcesses(accelerator)
    if config.activation_offloading and accelerator.device.type in offload.STAYS_ON:
        raise PrefError(f"--activation-offloading moves activations from the accelerator's memory to the CPU's, and this run computes on "
                        f"the {accelerator.device.type.upper()}: drop it, or run on a GPU")

    checkpoint = resume_checkpoint(config.resume) if config.resume else None  # None: a fresh start, or stopped before the first one
    state = read_state(checkpoint) if checkpoint else {"step": 0}
    start_step = state["step"]

    # -- the plan: every plugin built, every open setting resolved, before the slow model load --
    recorded = recorded_settings(output_folder(config), start_step) if config.resume else None  # what an earlier pref may have accepted
    plan = resolve_plan(config, registry, processes, start_step, recorded)
    objective, out_dir = plan.objective, plan.output_dir
    refuse_unsupported(config, world, accelerator.distributed_type, plan.needs.online, plan.needs.moves_reference)
    if config.save_every and config.save_every * config.grad_accum % plan.batches_per_rollout:
        # a checkpoint inside a rollout would resume from a rollout sampled again by a later policy
        raise PrefError(f"--save-every must be a multiple of {plan.batches_per_rollout // math.gcd(plan.batches_per_rollout, config.grad_accum)} "
                        f"for {config.objective}: checkpoints are taken between rollouts, so a resume is exact")
    record = run_record(config, plan, registry)
    if checkpoint:
        if state["world"] != world:
            raise PrefError(f"{checkpoint} was trained by {state['world']} processes, not {world}; resume it with {state['world']} "
                            f"(accelerate launch --num_processes {state['world']}), or start a new run")
        if state["seed"] != config.seed:
            raise PrefError(f"{checkpoint} was trained with seed {state['seed']}, not {config.seed}; resume with --seed {state['seed']}")
        record = resumed_record(record, out_dir, start_step, registry.names("dataset"), default_reward(plan))  # the settings the run started with, and what this resume changed
        if accelerator.is_main_process:  # a finished run's last step has no checkpoint: say which steps are trained again
            log.info(f"resuming {out_dir} from {os.path.basename(checkpoint)} (step {start_step} of {config.steps})")
    lock = claim_output_dir(out_dir, bool(config.resume), accelerator)  # before the data and the model: fail fast

    # -- the data, read with the tokenizer alone and checked, before the slow model load ------
    policy = HFPolicy(None, load_tokenizer(config.model, config.chat_template), max_length=config.max_length, max_prompt_length=config.max_prompt_length, packing=config.packing,
                      sample_sharded=config.sample_sharded, template_options=config.chat_template_options)
    builders = plan.datasets + plan.validation_datasets
    records = build_datasets(builders, policy)  # a builder that samples from the model waits for it
    if None not in records:
        split_datasets(records, len(plan.datasets), config.validation_split, config.seed)  # a dataset too small to hold some out
    if not plan.needs.online:  # a builder of other records (--dataset prompts for dpo) fails here, not at the first batch
        for entry, built in zip([*config.dataset, *config.validation_dataset], records):
            check_records(plan.needs, config.objective, built or [], entry)
    readers = [(plan.reward.columns, f"the reward {' + '.join(reward_names(config)) or type(plan.reward).__name__}")] if plan.reward else []
    sample_always = ", or let every step sample (distill's and gold's -o lmbda=1)" if plan.needs.off_policy_answers else ""  # GKD's answers
    for columns, reader in [*readers, (plan.needs.columns, config.objective)]:  # a reward or a loss that reads more of each prompt's row
        for entry, built in (zip(config.dataset, records) if config.dataset else [(None, [])]) if columns else []:
            require_columns(columns, reader, built or [], entry, sample_always if reader == config.objective else "")
    for entry, built in zip(config.dataset, records) if plan.needs.off_policy_answers else []:  # GKD's answers, before the model loads
        require_answers(plan.needs.off_policy_answers, built or [], entry)

    # -- policy, the objective's modules, the data that samples the policy, reference ------
    with quiet_new_heads({SCORE_HEAD}):  # a reward model's score head is new because it is trained from scratch here
        policy.load_model(config.model, dtype, plan.needs.model_kind, config.attn_implementation, config.quantize, accelerator.device)
    policy.model = prepare_for_training(policy.model, config, plan.needs.model_kind, plan.adapter)
    if config.cast_lm_head_to_fp32:
        head_in_float32(policy.model)  # before the reference's copy, which keeps it
    if not plan.needs.dropout:
        turn_off_dropout(policy.model)
    router_coef = router_loss_coef(policy.model, config.router_aux_loss_coef)  # a Mixture of Experts' load balancing; 0: dense
    policy.model.to(accelerator.device)
    objective.setup(policy)
    modules = objective.trainable_modules() if plan.needs.trainable_modules else {}
    for module in modules.values():
        module.to(accelerator.device).train()
        same_start(module, world)
    second = objective.second_model() if plan.needs.second_model else None
    second_optimizer = train_second = None
    if second is not None:
        second.model.to(accelerator.device)
        same_start(second.model, world)
        keep_trainable_in_float32(second.model)  # a bf16 run's discriminator keeps float32 optimizer state too
        # AdamW's defaults, as D2PO's own optimizer had
        second_optimizer = torch.optim.AdamW([p for p in second.model.parameters() if p.requires_grad], lr=second.lr)
        train_second = partial(train_second_model, second, second_optimizer, processes, accelerator.autocast)
    records = build_datasets(builders, policy, built=records)
    example_sets, validation = split_datasets(records, len(plan.datasets), config.validation_split, config.seed)
    examples = [example for examples in example_sets for example in examples]
    if not plan.needs.online and not examples:
        raise PrefError(f"objective {config.objective!r} trains on a dataset: pass --dataset FILE")
    reference = build_reference(config, plan, policy, examples + validation, processes, dtype, accelerator.device)
    keep_trainable_in_float32(policy.model, *modules.values())  # after the reference took its copy
    if config.fsdp:  # after the reference: a frozen copy or the cached log-probs come from the whole model
        # a frozen copy is sharded too (each process holds 1/N of it); its forwards are then collectives, which every process
        # makes together: each objective's loss and each evaluation calls the reference the same number of times on each
        frozen = [reference.model] if isinstance(reference, FrozenReference) else []
        for whole in [policy.model, *frozen]:
            if config.packing and may_pack(whole):  # sharded, the probe is a collective: every process runs it now, before a
                packs_correctly(whole)             # process that found the log-probs cached (and so skipped it) probes alone
        shard(policy.model, dtype)
        if frozen:
            reference.shard(dtype)
    # a batch larger than the dataset would hold a row twice: it holds every row once instead (online, a prompt may come twice: more samples of it)
    batch_size = config.batch_size if plan.needs.online else rows_per_batch(len(examples), config.batch_size, world)
    if batch_size < config.batch_size and accelerator.is_main_process:
        per = f" x {world} processes" if world > 1 else ""
        log.info(f"the dataset's {len(examples)} training rows are fewer than --batch-size {config.batch_size}{per}: a batch holds {batch_size * world}, each row once")
    dropped: list[int] = []  # the training prompts the objective leaves out after seeing the starting policy's samples of each (A*-PO's)
    if plan.reward is not None:  # TRL's trainer_state: the optimizer steps done when samples are scored, from the starting ones on
        plan.reward.at_step(start_step, config.steps)
    if plan.needs.starting_samples:
        items = examples or list(plan.reward.default_prompts)
        if checkpoint:  # a resume keeps what the run started with
            dropped = state["dropped_prompts"]
        else:
            dropped = start_objective(config.objective, plan, policy, items, processes, batch_size, config.fsdp)
        (examples,), example_sets = without([items], dropped), without(example_sets, dropped)
    order = build_sampler(config, plan, policy, example_sets, rank, world, batch_size) if plan.sampler else None
    data = build_data(config, plan, policy, examples, rank, world, order, train_second, processes, batch_size=batch_size)

    # -- optimizer and schedule -------------------------------------------------
    module_params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    params = [p for p in policy.model.parameters() if p.requires_grad] + module_params
    # the fused kernel updates all parameters in one call; on CPU the default per-tensor loop costs ~4% of a DPO step.
    # It cannot mix sharded weights with the objective's own whole modules (PPO's value head): those take the loop
    mixed = bool(config.fsdp and module_params)
    fused = accelerator.device.type in ("cpu", "cuda") and not mixed
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused, foreach=False if mixed else None)
    scheduler = make_scheduler(optimizer, config)
    if config.fsdp:  # FSDP2 averages the gradients itself: no DDP around the model
        model, optimizer = policy.model, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(policy.model, optimizer)
    policy.model = model
    params = [p for p in model.parameters() if p.requires_grad] + module_params  # accelerate's own FSDP replaces them
    model.train()
    moved_reference = reference.model if plan.needs.moves_reference and isinstance(reference, FrozenReference) else None
    trained = Trained(unwrap(model), optimizer, scheduler, modules, second.model if second else None, second_optimizer, moved_reference,
                      objective.reference_state(moved_reference) if moved_reference is not None else {})

    # -- resume -------------------------------------------------------------------
    if checkpoint:
        state, objective_state = load_checkpoint(checkpoint, trained, rank)
        data.load_state(state["data"])
        objective.load_state_dict(objective_state)
    loggers = []
    if accelerator.is_main_process:
        set_aside_steps_after(out_dir, start_step)
        with open(os.path.join(out_dir, RUN_FILE), "w") as f:
            json.dump(record, f, indent=2, default=str)
        loggers = [registry.create("logger", name, output_dir=out_dir, config=final_config(record)) for name in plan.loggers]
    best = read_best(out_dir, start_step)

    # -- the loop -------------------------------------------------------------------
    # TRL's num_tokens: the real tokens (prompts and answers, every process's) trained on since the run began, so the count goes on
    # across a resume; None, and not logged, after a resume from a checkpoint written before pref kept it
    tokens_seen = state.get("num_tokens", None if checkpoint else 0)
    stopped, unlogged, evaluated = "", None, state.get("evaluated", False)  # unlogged: the last step's (step, figures) when log_every skipped it; evaluated: it was
    interrupted = 0  # the signal that stopped the run after a step, with a checkpoint
    offloaded = offload.OffloadedActivations(unwrap(model)) if config.activation_offloading else nullcontext()
    with loggers_running(loggers, config.steps, start_step), StopRequests(announce=accelerator.is_main_process) as stop_requests:
        for step in range(start_step + 1, config.steps + 1):
            if plan.reward is not None:
                plan.reward.at_step(step - 1, config.steps)
            # forward and backward, accumulated over micro-batches
            reports: list[dict[str, float]] = []  # each micro-batch's figures
            completions: list[dict[str, Any]] = []  # --log-completions: the rollouts this step drew
            t_start, real_tokens, padded_tokens, items = time.perf_counter(), 0, 0, 0
            # a loss that is a mean over items (SFT's tokens), over several micro-batches or processes, weighs each micro-batch by
            # its items, at a scale common to every process; the step's gradients are then divided by all processes' items
            # (TRL's num_items_in_batch)
            items_scale = config.batch_size * config.max_length * config.grad_accum if config.grad_accum > 1 or world > 1 else None
            for micro in range(config.grad_accum):
                try:
                    batch, data_metrics = next_batch_together(data, accelerator, lambda: sampling_diverged(step, config))
                except NoUsablePairs:
                    # after the first step: the policy now earns one reward for every sample, nothing is
                    # left to learn, so keep the model (every process sees the same outcome and stops with it)
                    if step == 1:  # a resumed run's model was trained: it stops as the uninterrupted run does
                        raise
                    stopped = (f"Stopped after step {step - 1} of {config.steps}: every pool of the policy's samples was "
                               "all-equal or unusable, so no pair is left to learn from")
                    break
                if config.log_completions:
                    completions += completion_rows(batch)
                real, padded = count_tokens(batch)
                real_tokens, padded_tokens = real_tokens + real, padded_tokens + padded
                count = objective.loss_items(batch) if items_scale else None
                items += count or 0
                t_update = time.perf_counter()
                last = micro == config.grad_accum - 1
                with nullcontext() if last else no_gradient_sync(accelerator, model):
                    with accelerator.autocast(), offloaded, policy.router_losses() if router_coef else nullcontext([]) as router_losses:
                        loss, metrics = checked_loss(config.objective, objective.loss(policy, reference, batch))
                    if router_losses:  # a Mixture of Experts: its load balancing joins each loss, as in TRL
                        router_loss = torch.stack(router_losses).mean()
                        loss, metrics = loss + router_coef * router_loss, {**metrics, "aux_loss": router_loss.item()}
                    accelerator.backward(loss / config.grad_accum if count is None else loss * (count / items_scale))
                reports.append({"loss": loss.item(), **metrics, **data_metrics, "time/update": time.perf_counter() - t_update})
            if stopped:
                # the model the run ends with is evaluated (unless its step just was) and its step logged whatever log_every says:
                # into that step's line when log_every skipped it, else as one more line for the same step
                figures = {}
                if plan.evaluators and not evaluated:
                    figures, best = evaluate_and_keep_best(plan, policy, reference, validation, step - 1, best, accelerator)
                    figures = combine_across_processes(processes, figures)
                    mark_evaluated(out_dir, step - 1, write=accelerator.is_main_process)  # a resume from there stops at once, as this did
                if unlogged or figures:
                    for logger in loggers:
                        logger.log(step - 1, {**(unlogged[1] if unlogged else {}), **figures})
                break
            totals = combine_reports(reports)

            # clip and update (the objective's own modules are outside DDP: average their gradients here)
            t_step = time.perf_counter()
            if world > 1:
                for p in module_params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            counts = processes.gather([(real_tokens, items, stop_requests.signal)])  # every process's: TRL's num_tokens, the step's loss items, a stop asked
            # a stop asked of any process stops all after this step, if a resume from it is exact (between rollouts)
            interrupted = max(c[2] for c in counts) if step < config.steps and step * config.grad_accum % plan.batches_per_rollout == 0 else 0
            all_items = sum(c[1] for c in counts)
            if all_items:  # the gradients, averaged over processes, of each loss's sum over its items: now their mean over all items
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(world * items_scale / all_items)
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            same_decision(accelerator, check_step(step, totals["loss"], float(grad_norm), config))  # NaN: stop before the update
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_step(step, policy, reference)
            totals["time/update"] += time.perf_counter() - t_step
            totals["grad_norm"] = float(grad_norm)
            totals["lr"] = scheduler.get_last_lr()[0]
            totals["tokens/padding_fraction"] = 1 - real_tokens / max(1, padded_tokens)
            totals["tokens/per_second"] = real_tokens / (time.perf_counter() - t_start)  # real tokens, data included
            if tokens_seen is not None:
                tokens_seen += sum(c[0] for c in counts)
                totals["num_tokens"] = float(tokens_seen)

            # evaluate and keep the best model (every process gets the same figures)
            evaluated = bool(plan.evaluators) and (step == config.steps or bool(config.eval_every and step % config.eval_every == 0))
            if evaluated:
                figures, best = evaluate_and_keep_best(plan, policy, reference, validation, step, best, accelerator)
                totals.update(figures)

            # log
            totals = combine_across_processes(processes, totals)
            logged = step % config.log_every == 0 or evaluated or step == config.steps or interrupted
            completions = processes.gather(completions) if config.log_completions and logged else []  # a collective
            if logged:
                for logger in loggers:
                    logger.log(step, totals)
                    if completions:
                        logger.log_completions(step, completions)
                unlogged = None
            else:
                unlogged = (step, totals)
            for logger in loggers:
                logger.show(step, totals)

            # checkpoint
            if (config.save_every and step % config.save_every == 0 or interrupted) and step < config.steps:
                check_weights(params, step, config)
                save_state = {"seed": config.seed, "data": data.state(), "world": world, "evaluated": evaluated, "num_tokens": tokens_seen,
                              **({"dropped_prompts": dropped} if plan.needs.starting_samples else {})}
                rng_states, objective_states = processes.gather([rng_state()]), processes.gather([objective.state_dict()])
                save_checkpoint(out_dir, step, trained, save_state, rng_states, objective_states, config.keep_checkpoints,
                                write=accelerator.is_main_process)  # every process: a sharded model is gathered first
                accelerator.wait_for_everyone()
            if interrupted:
                break

    if interrupted:  # the run goes on from its checkpoint with --resume
        for logger in loggers:
            logger.close()
        if lock is not None:
            lock.release()
        raise RunInterrupted(f"stopped by {signal.Signals(interrupted).name} after step {step} of {config.steps}, saved as checkpoint-{step:06d}; "
                             f"go on with: pref run --resume {out_dir}", interrupted, accelerator.is_main_process)

    # -- the final model, in Hugging Face format ------------------------------------------
    if stopped and accelerator.is_main_process:
        log.warning(stopped)
    check_weights(params, config.steps, config)
    weights = whole_state_dict(unwrap(model)) if is_sharded(unwrap(model)) else None  # every process takes part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomically(os.path.join(out_dir, FINAL_DIR), lambda path: save_final(policy, path, plan.adapter, config.merge_lora, weights,
                                                                                   dtype if config.quantize else None, plan.needs.model_kind))
        write_model_card(out_dir)  # final/README.md
        objective.save(out_dir)
        for logger in loggers:  # trackers record where the model went
            logger.finish(os.path.join(out_dir, FINAL_DIR))
            logger.close()
    accelerator.wait_for_everyone()
    if lock is not None:
        lock.release()
    policy.model = unwrap(model)
    return out_dir, policy
