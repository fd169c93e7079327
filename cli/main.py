"""`pref`: train, inspect plugins, sample and compare models."""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import click

from pref.cli.kinds import KindChoice
from pref.cli.new_plugin import new_plugin
from pref.cli.report import report
from pref.errors import PrefError, RunInterrupted
from pref.registry import KINDS


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


class PrefGroup(click.Group):
    """Turns a `PrefError` into one line on stderr and exit code 2, without a traceback; a run stopped by a signal exits with 128 + its number."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PrefError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except RunInterrupted as exc:  # stopped after a step by SIGINT or SIGTERM, with a checkpoint
            if exc.main_process:
                click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # Ctrl-C outside a run's steps, or twice
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            # a full, read-only or forbidden disk met outside the writes that check for it (a log line, run.json)
            from pref.checkpoint import disk_error

            target = exc.filename or "a file"
            click.echo(f"Error: {disk_error(f'cannot write {target}', exc)}", err=True)
            sys.exit(2)


@click.group(cls=PrefGroup)
@click.version_option(package_name="pref")
def cli() -> None:
    """Preference optimization of causal language models."""
    # pref's own notes (such as the one-off build of the default model) on stderr, as plain lines
    logger = logging.getLogger("pref")
    if not any(isinstance(h, EchoHandler) for h in logger.handlers):
        logger.addHandler(EchoHandler())
        logger.setLevel(logging.INFO)


class EchoHandler(logging.Handler):
    """Log records as plain lines on whatever stderr is when they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


def parse_options(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """KEY=VALUE strings into a dict; values are read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    from pref.config import read_yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrefError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key.strip().replace("-", "_")] = read_yaml(value) if value else ""
        except yaml.YAMLError as exc:
            raise PrefError(f"{flag} {pair!r}: the value is not valid YAML ({exc.problem}); fix it, or quote a text: {key}='\"{value}\"'") from None
    return options


def load_registry() -> Any:
    from pref.registry import load_registry as load

    registry = load()
    for failure in registry.failures:
        click.echo(f"Warning: plugin {failure.name} ({failure.package}) failed to load: {failure.error}", err=True)
    return registry


# -- pref run -------------------------------------------------------------------


@cli.command()
@click.option("--objective", help="Training objective, e.g. dpo (see `pref list-plugins`).")
@click.option("--dataset", multiple=True, help="Dataset file, folder, hub name or builder name; repeatable.")
@click.option("--reward", multiple=True, help="Reward plugin for online objectives; repeat it to sum several, weighted by --reward-weights.")
@click.option("--reward-weights", help="One weight per --reward, in order, e.g. 1,0.5 (default 1 each).")
@click.option("--selector", help="Pair selector for online objectives (default: the objective's own).")
@click.option("--embedder", help="Embedder plugin; `sentence-transformers:NAME_OR_PATH` picks its model.")
@click.option("--model", help="Hub id or local path (default: the embedded default model).")
@click.option("--trust-remote-code/--no-trust-remote-code", default=None, help="Let models and tokenizers run the Python code they ship (their config's auto_map); read it first.")
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int, help="Rows (pairs, or prompts when online) per process and micro-step.")
@click.option("--grad-accum", type=int, help="Micro-steps accumulated per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate of AdamW.")
@click.option("--beta", type=float, help="KL strength beta of the objective.")
@click.option("--samples-per-prompt", "-k", type=int, help="Samples per prompt when online (K).")
@click.option("--output-dir", help="Where the run goes (default: runs/OBJECTIVE-TIMESTAMP).")
@click.option("--config", "config_file", help="A TOML, YAML or JSON file of the same settings; flags override it.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="Force a device.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), help="Autocast precision.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), help="Weights as loaded (auto: bf16 on a bf16-capable GPU for a bf16/fp16 checkpoint, else float32).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Recompute activations in the backward pass: less memory, ~30% more time.")
@click.option("--activation-offloading/--no-activation-offloading", default=None, help="Keep the activations the backward needs in CPU memory, not the GPU's: less GPU memory, time for the copies (TRL's activation_offloading).")
@click.option("--cast-lm-head-to-fp32/--no-cast-lm-head-to-fp32", default=None, help="Keep the LM head's weights and compute its logits in float32 (log-probs and samples of a bf16 model; ScaleRL, TRL's cast_lm_head_to_fp32).")
@click.option("--chat-template", help="A Jinja file, or a model (folder or hub id) whose tokenizer's chat template replaces the model's own (TRL's chat_template_path).")
@click.option("--attn-implementation", help="transformers' attention kernel for the trained model: sdpa (its default), eager, flash_attention_2, ...")
@click.option("--fsdp/--no-fsdp", default=None, help="Shard weights, gradients and optimizer state over the processes (torch FSDP2; needs 2+ processes).")
@click.option("--sample-sharded/--no-sample-sharded", default=None,
              help="With --fsdp: sample gathering one layer at a time (slower), never the whole model.")
@click.option("--lora/--no-lora", default=None, help="Train LoRA adapters (peft) on a frozen base instead of every weight: --adapter lora.")
@click.option("--lora-option", multiple=True, help="LoRA option KEY=VALUE (r, alpha, dropout, target_modules); repeatable.")
@click.option("--adapter", help="Adapter plugin trained on a frozen base instead of every weight (see `pref list-plugins --kind adapter`).")
@click.option("--adapter-option", multiple=True, help="Adapter option KEY=VALUE; repeatable.")
@click.option("--merge-lora/--no-merge-lora", default=None, help="Also write final/merged/: full weights with the adapter folded in.")
@click.option("--quantize", type=click.Choice(["nf4", "fp4"]), help="Load the base model's linear layers in 4 bits (bitsandbytes) under the "
              "adapter: QLoRA with --lora and nf4. Needs pip install 'pref[quantize]'.")
@click.option("--max-length", type=int, help="Most tokens in a prompt + answer row.")
@click.option("--max-prompt-length", type=int, help="Most prompt tokens (kept from the end; at most --max-length - 1).")
@click.option("--max-new-tokens", type=int, help="Most new tokens per sampled answer.")
@click.option("--temperature", type=float, help="Sampling temperature (0: greedy).")
@click.option("--top-p", type=float, help="Nucleus sampling: keep the smallest token set of this probability.")
@click.option("--top-k", type=int, help="Sample among the K likeliest tokens (0: all).")
@click.option("--min-p", type=float, help="Sample among tokens at least this share of the likeliest one's probability (0: off; TRL's min_p).")
@click.option("--bucket-window", type=int, help="Offline batches of similar-length rows, sorted within windows of N batches (the sampler length-buckets; 0: plain shuffle).")
@click.option("--packing/--no-packing", default=None, help="Pack a forward's rows back to back without padding where the model allows it (default: on).")
@click.option("--warmup-steps", type=int, help="Linear learning-rate warmup steps.")
@click.option("--weight-decay", type=float, help="AdamW weight decay.")
@click.option("--router-aux-loss-coef", type=float, help="Weight of a Mixture-of-Experts model's load-balancing loss (default: the model config's; 0: off).")
@click.option("--threads", type=int, help="CPU threads of torch (default: 1 for the embedded default model, else one per core).")
@click.option("--reference", type=click.Choice(["auto", "model", "cached", "none"]), help="Frozen model, cached log-probs, or none.")
@click.option("--reference-model", help="The reference is this model (hub id or folder, sharing the policy's vocabulary), not the starting policy: TRL's ref_model, distill's teacher.")
@click.option("--save-every", type=int, help="Write a checkpoint every N steps (PPO: a multiple of the steps a rollout serves, so a resume is exact).")
@click.option("--keep-checkpoints", type=int, help="How many checkpoints to keep.")
@click.option("--resume", help="Continue the run in this folder (or from this checkpoint).")
@click.option("--logger", "loggers", multiple=True, help="Metrics logger (default: jsonl); repeatable, e.g. --logger jsonl --logger tensorboard.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar on stderr (the logger progress; default: on).")
@click.option("--log-every", type=int, help="Log the metrics every N steps (default 1; each evaluated step and the last are logged too).")
@click.option("--log-completions/--no-log-completions", default=None, help="Online objectives: the samples each logged step drew (prompts, completions, scores) to completions.jsonl and the trackers.")
@click.option("--eval-every", type=int, help="Evaluate every N steps (and at the last step done, an early stop's too): validation loss, best model, test prompts.")
@click.option("--validation-split", type=float, help="Share of each dataset held out for the validation loss, e.g. 0.1.")
@click.option("--validation-dataset", multiple=True, help="Held-out data for the validation loss instead of a split; repeatable.")
@click.option("--test-prompt", "test_prompts", multiple=True, help="Prompt answered at each evaluation into generations.jsonl; repeatable.")
@click.option("--evaluator", help="Evaluator run at each evaluation besides pref's own (see `pref list-plugins --kind evaluator`).")
@click.option("--evaluator-option", multiple=True, help="Evaluator option KEY=VALUE; repeatable.")
@click.option("--curriculum/--no-curriculum", default=None, help="Sample the datasets by an automatic, difficulty-driven curriculum.")
@click.option("--curriculum-option", multiple=True, help="Curriculum option KEY=VALUE (eta, every, refresh, sample_size, variance_weight); repeatable.")
@click.option("--sampler", help="Sampler choosing which records come next (see `pref list-plugins --kind sampler`); default: length-buckets offline, shuffled online.")
@click.option("--sampler-option", multiple=True, help="Sampler option KEY=VALUE; repeatable.")
@click.option("--option", "-o", "objective_option", multiple=True, help="Objective option KEY=VALUE; repeatable.")
@click.option("--chat-template-option", multiple=True, help="A variable of the model's chat template KEY=VALUE, e.g. enable_thinking=false (Qwen3); repeatable.")
@click.option("--reward-option", multiple=True, help="Reward option KEY=VALUE, or NAME.KEY=VALUE for one of several rewards; repeatable.")
@click.option("--dataset-option", multiple=True, help="Dataset builder option KEY=VALUE; repeatable.")
@click.option("--selector-option", multiple=True, help="Pair selector option KEY=VALUE; repeatable.")
def run(config_file: str | None, beta: float | None, objective_option, reward_option, dataset_option, selector_option, curriculum_option, sampler_option,
        lora_option, adapter_option, evaluator_option, chat_template_option, **flags: Any) -> None:
    """Train a model with a preference objective."""
    from pref.checkpoint import STATE_FILE, read_state
    from pref.config import build_config, read_config_file
    from pref.reporting.runs import final_config
    from pref.run_folder import RUN_FILE, moved_data
    from pref.train import train

    file_values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    given = {k: v for k, v in flags.items() if v is not None and v != ()}  # repeated flags' tuples: build_config takes them as lists
    options = {
        "objective_options": parse_options(objective_option, "--option"),
        "reward_options": parse_options(reward_option, "--reward-option"),
        "dataset_options": parse_options(dataset_option, "--dataset-option"),
        "selector_options": parse_options(selector_option, "--selector-option"),
        "curriculum_options": parse_options(curriculum_option, "--curriculum-option"),
        "sampler_options": parse_options(sampler_option, "--sampler-option"),
        "lora_options": parse_options(lora_option, "--lora-option"),
        "adapter_options": parse_options(adapter_option, "--adapter-option"),
        "evaluator_options": parse_options(evaluator_option, "--evaluator-option"),
        "chat_template_options": parse_options(chat_template_option, "--chat-template-option"),
    }
    if beta is not None:
        options["objective_options"]["beta"] = beta
    given.update({k: v for k, v in options.items() if v})
    embedder = given.get("embedder")
    if embedder and ":" in embedder:
        given["embedder"], model = embedder.split(":", 1)
        given["embedder_options"] = {"model": model}

    if file_values.get("resume") and not given.get("resume"):  # it continues that run as the flag does, its settings recorded
        given["resume"] = file_values.pop("resume")
    if given.get("resume"):
        run_dir = given["resume"]
        if not os.path.exists(os.path.join(run_dir, RUN_FILE)):
            run_dir = os.path.dirname(os.path.normpath(run_dir))
        record_path = os.path.join(run_dir, RUN_FILE)
        if not os.path.exists(record_path):
            raise PrefError(f"{given['resume']} is not a pref run folder (no {RUN_FILE}); pass the --output-dir of an earlier run")
        checkpoint = given["resume"] if os.path.exists(os.path.join(given["resume"], STATE_FILE)) else None
        until = read_state(checkpoint)["step"] if checkpoint else math.inf  # a checkpoint given: the resumes after it are undone
        try:
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            recorded = {**record["config"], **final_config(record, until)}  # with the changes of its earlier resumes
            file_values = {**{k: v for k, v in recorded.items() if k != "resume"}, **file_values}  # a --config file changes it too
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not a run's record
            raise PrefError(f"cannot resume {run_dir}: {record_path} is not a pref run record (damaged, or another program's); "
                            "pass the --output-dir of an earlier run") from None
        given["output_dir"] = run_dir
        moved = moved_data({**file_values, **given})
        if moved:
            raise PrefError(f"cannot resume {run_dir}: {moved}")

    config = build_config(file_values, given)
    registry = load_registry()
    out_dir = train(config, registry)
    from accelerate import PartialState

    if PartialState().is_main_process:
        click.echo(f"Saved to {os.path.join(out_dir, 'final')}", err=True)


# -- pref list-plugins ---------------------------------------------------------------


@cli.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--kind", type=KindChoice(list(KINDS)), help="Only this kind.")
def list_plugins(as_json: bool, kind: str | None) -> None:
    """List objectives, rewards, selectors, dataset builders, embedders, loggers, samplers, adapters and evaluators."""
    registry = load_registry()
    items = registry.items(kind)
    if as_json:
        rows = [
            {"kind": i.kind, "name": i.name, "package": i.package, "version": i.version, "builtin": i.builtin, "description": i.description}
            for i in items
        ]
        failures = [{"name": f.name, "package": f.package, "error": f.error} for f in registry.failures]
        click.echo(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    # a table per kind, the name whole and the package beside its version: in 80 columns the description keeps half the width
    console = Console()
    for name in dict.fromkeys(i.kind for i in items):
        table = Table(title=f"{name} plugins", title_justify="left", title_style="bold")
        table.add_column("name", no_wrap=True)
        table.add_column("package", no_wrap=True)
        table.add_column("description")
        for i in items:
            if i.kind == name:
                table.add_row(i.name, f"{i.package} {i.version}", i.description)
        console.print(table)


# -- pref new-plugin ------------------------------------------------------------------

cli.add_command(new_plugin)  # the command lives in its own module
cli.add_command(report)


# -- pref generate / pref compare ---------------------------------------------------------


@dataclass(frozen=True)
class Loading:
    """How `generate`, `eval` and `compare` load a model: their `--device`, `--dtype`, `--attn-implementation`, `--quantize`,
    `--chat-template-option`s and `--chat-template` (`--trust-remote-code` holds for the whole command: `pref.models.remote_code`)."""

    device: str = "auto"
    dtype: str = "auto"
    attention: str | None = None
    quantize: str | None = None
    template_options: tuple[tuple[str, Any], ...] = ()
    chat_template: str | None = None


def load_policy(model: str | None, loading: Loading = Loading()) -> Any:
    """The model to sample, on `--device` (auto: a GPU if there is one) with its weights in `--dtype`, through `attention`'s
    kernel; with `--quantize`, its linear layers in 4 bits (an adapter's base, as a QLoRA run trained it)."""
    from pref.models import load_tokenizer
    from pref.policy import HFPolicy
    from pref.precision import resolve_device, resolve_dtype

    where = resolve_device(loading.device)
    if loading.quantize and importlib.util.find_spec("bitsandbytes") is None:
        raise PrefError(f"--quantize {loading.quantize} needs the bitsandbytes package: pip install 'pref[quantize]'")
    policy = HFPolicy(None, load_tokenizer(model, loading.chat_template), template_options=dict(loading.template_options))
    policy.load_model(model, resolve_dtype(loading.dtype, where, model), attention=loading.attention, quantize=loading.quantize, device=where)
    if not loading.quantize:  # a 4-bit model is loaded where it computes
        policy.model.to(where)
    return policy


def sample(model: str | None, prompts: list[str], k: int, max_new_tokens: int, temperature: float, seed: int,
           loading: Loading = Loading()) -> list[list[str]]:
    import torch

    from pref.interfaces import SamplingConfig

    policy = load_policy(model, loading)
    torch.manual_seed(seed)
    return policy.generate(prompts, k, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature))


device_options = [
    click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]),
                 help="Where the model runs (auto: a CUDA GPU, else MPS, else the CPU)."),
    click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
                 help="Weights as loaded (auto: bf16 on a bf16-capable GPU for a bf16/fp16 checkpoint, else float32)."),
    click.option("--attn-implementation", "attention", help="transformers' attention kernel: sdpa (its default), eager, flash_attention_2, ..."),
    click.option("--quantize", type=click.Choice(["nf4", "fp4"]), help="Load the model's linear layers in 4 bits (bitsandbytes), as a "
                 "QLoRA run's adapter was trained on them. Needs pip install 'pref[quantize]'."),
    click.option("--chat-template-option", "template_option", multiple=True,
                 help="A variable of the model's chat template KEY=VALUE, e.g. enable_thinking=false (Qwen3); repeatable."),
    click.option("--chat-template", help="A Jinja file, or a model whose tokenizer's chat template replaces the model's own (a base "
                 "model compared with what a --chat-template run made of it)."),
    click.option("--trust-remote-code", is_flag=True, help="Let the model and its tokenizer run the Python code they ship (their config's "
                 "auto_map); read it first."),
]


def with_device_options(func: Any) -> Any:
    """The options above, handed to `func` as one `loading` (a `Loading`); `--trust-remote-code` holds while `func` runs."""
    @functools.wraps(func)
    def command(*args: Any, device: str, dtype: str, attention: str | None, quantize: str | None, template_option: tuple[str, ...],
                chat_template: str | None, trust_remote_code: bool, **kwargs: Any) -> Any:
        from pref.models import remote_code

        options = tuple(parse_options(template_option, "--chat-template-option").items())
        with remote_code(trust_remote_code):
            return func(*args, loading=Loading(device, dtype, attention, quantize, options, chat_template), **kwargs)

    for option in reversed(device_options):
        command = option(command)
    return command


sampling_options = [
    click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeatable."),
    click.option("-n", "--samples", default=1, show_default=True, type=click.IntRange(min=1), help="Answers per prompt."),
    click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1)),
    click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 means greedy."),
    click.option("--seed", default=0, show_default=True),
]


def with_sampling_options(func: Any) -> Any:
    for option in reversed(sampling_options):
        func = option(func)
    return func


@cli.command()
@click.option("--model", help="Hub id or local path (default: the embedded default model).")
@with_sampling_options
@with_device_options
def generate(model, prompts, samples, max_new_tokens, temperature, seed, loading) -> None:
    """Print a model's answers to prompts."""
    answers = sample(model, list(prompts), samples, max_new_tokens, temperature, seed, loading)
    for prompt, outs in zip(prompts, answers):
        click.echo(f"> {prompt}")
        for answer in outs:
            click.echo(answer)


def report_and_answers(model: str | None, reward_name: str, reward_options: dict, prompts: list[str], samples: int | None, max_new_tokens: int,
                       temperature: float, seed: int, loading: Loading = Loading(), dataset: str | None = None) -> tuple[dict[str, float], list[str]]:
    """The reward's report on a model's sampled answers, and those answers. `dataset`: its rows' prompts (the `prompts` builder's
    records, whose columns a reward may read) instead of `prompts`; `samples` None: one answer per row, else 200 in all."""
    from pref.reporting.evaluate import evaluate_with_answers
    from pref.interfaces import SamplingConfig
    from pref.online import require_columns

    registry = load_registry()
    reward = registry.create("reward", reward_name, reward_options)
    if dataset and prompts:
        raise PrefError("--prompt and --dataset both give the prompts to answer: pass one of them")
    records = registry.create("dataset", "prompts", {"path": dataset}).build() if dataset else prompts or list(reward.default_prompts)
    if reward.columns and not dataset:
        raise PrefError(f"the reward {reward_name} reads the column{'s' * (len(reward.columns) > 1)} {', '.join(reward.columns)} of each "
                        "prompt's row, which --prompt texts do not have: pass --dataset with such rows")
    if reward.columns:
        require_columns(reward.columns, f"the reward {reward_name}", records, dataset)
    if not records:
        raise PrefError(f"reward {reward_name!r} has no default prompts: pass --prompt or --dataset")
    policy = load_policy(model, loading)
    samples = samples or (len(records) if dataset else DEFAULT_EVAL_SAMPLES)
    return evaluate_with_answers(policy, reward, records, samples, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature), seed)


DEFAULT_EVAL_SAMPLES = 200  # `pref eval`'s answers in all, given prompts


eval_options = [
    click.option("--reward", required=True, help="Reward plugin whose report to compute, e.g. noun-diversity."),
    click.option("--reward-option", multiple=True, help="Reward option KEY=VALUE; repeatable."),
    click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeatable (default: the reward's own prompts)."),
    click.option("--dataset", help="Answer the prompts of this file's rows instead (as `pref run --dataset` reads them for online "
                 "objectives: a reward reads the columns of each row it names)."),
    click.option("--samples", type=click.IntRange(min=1), help="Answers sampled in all (default: 200, or one per --dataset row)."),
    click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(min=1)),
    click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0)),
    click.option("--seed", default=0, show_default=True),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
]


def with_eval_options(func: Any) -> Any:
    for option in reversed(eval_options):
        func = option(func)
    return func


@cli.command("eval")
@click.option("--model", help="Hub id or local path (default: the embedded default model).")
@with_eval_options
@with_device_options
def eval_command(model, reward, reward_option, prompts, dataset, samples, max_new_tokens, temperature, seed, as_json, loading) -> None:
    """Sample a model and report quality and diversity under a reward."""
    report, _ = report_and_answers(model, reward, parse_options(reward_option, "--reward-option"), list(prompts), samples, max_new_tokens,
                                   temperature, seed, loading, dataset)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from pref.models import DEFAULT_MODEL

    table = Table("figure", model or DEFAULT_MODEL)
    for key, value in report.items():
        table.add_row(key, format_value(value))
    Console().print(table)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


COMPARE_FIGURE = "pref compare"  # in the PNG's Software field: how pref knows a figure it may replace


def drawn_by_compare(path: str) -> bool:
    """True if `path` is a PNG that `pref compare --figure` drew."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == COMPARE_FIGURE
    except (OSError, ValueError):  # a folder, not an image, unreadable
        return False


@cli.command()
@click.option("--before", required=True, help="The model before training (hub id, path, or pref-default).")
@click.option("--after", required=True, help="The model after training.")
@click.option("--reward", help="Compare reports under this reward instead of printing answers.")
@click.option("--reward-option", multiple=True, help="Reward option KEY=VALUE; repeatable.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeatable.")
@click.option("--dataset", help="With --reward: answer the prompts of this file's rows instead, as `pref eval --dataset`.")
@click.option("-n", "--samples", type=click.IntRange(min=1), help="Answers per prompt (default 1), or in all with --reward (default 200, "
              "or one per --dataset row).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Default 64, or 8 with --reward.")
@click.option("--temperature", type=click.FloatRange(min=0), help="Default 0 (greedy), or 1 with --reward.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (with --reward).")
@click.option("--figure", help="With --reward: also draw the most frequent answers before and after as bars into this PNG file.")
@with_device_options
def compare(before, after, reward, reward_option, prompts, dataset, samples, max_new_tokens, temperature, seed, as_json, figure, loading) -> None:
    """Two models side by side: their answers, or their reports under a reward."""
    from rich.console import Console
    from rich.table import Table

    if figure and not reward:
        raise PrefError("--figure draws the answers sampled for --reward NAME: pass --reward too")
    if as_json and not reward:
        raise PrefError("--json prints the reports under --reward NAME: pass --reward too")
    if dataset and not reward:
        raise PrefError("--dataset gives the prompts whose answers --reward NAME scores: pass --reward too, or --prompt TEXT to see answers")
    if figure and not figure.lower().endswith(".png"):
        raise PrefError(f"--figure {figure}: the figure is a PNG file; give a name ending in .png")
    if figure and os.path.lexists(figure) and not drawn_by_compare(figure):
        raise PrefError(f"--figure {figure} exists and is not a figure pref compare drew; give another name "
                        "(pref replaces only figures it drew)")
    from pref.models import load_tokenizer
    from pref.precision import resolve_device

    resolve_device(loading.device)  # a device that is not here fails before the default model is built or a tokenizer fetched
    for model in (before, after):  # a wrong --after fails before --before is sampled
        load_tokenizer(model)
    if reward:
        args = (reward, parse_options(reward_option, "--reward-option"), list(prompts), samples, max_new_tokens or 8,
                1.0 if temperature is None else temperature, seed, loading, dataset)
        (first, first_answers), (second, second_answers) = report_and_answers(before, *args), report_and_answers(after, *args)
        if figure:
            from pref.reporting.figures import answers_figure

            title = f"Most frequent answers under {reward}, {len(first_answers)} samples each"
            os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
            answers_figure(first_answers, second_answers, (f"before: {before}", f"after: {after}"), title=title).savefig(
                figure, dpi=110, metadata={"Software": COMPARE_FIGURE})
            click.echo(f"Wrote {figure}", err=True)
        diff = {k: second[k] - first[k] for k in first if isinstance(first[k], (int, float)) and isinstance(second.get(k), (int, float))}
        if as_json:
            click.echo(json.dumps({"before": first, "after": second, "difference": diff}, indent=2))
            return
        table = Table("figure", f"before: {before}", f"after: {after}", "difference")
        for key in first:
            table.add_row(key, format_value(first[key]), format_value(second.get(key)), format_value(diff[key]) if key in diff else "")
        Console().print(table)
        return
    if not prompts:
        raise PrefError("pass --prompt TEXT (repeatable), or --reward NAME to compare reports")
    args = (list(prompts), samples or 1, max_new_tokens or 64, 0.0 if temperature is None else temperature, seed, loading)
    first, second = sample(before, *args), sample(after, *args)
    table = Table("prompt", f"before: {before}", f"after: {after}", show_lines=True)
    for prompt, a, b in zip(prompts, first, second):
        table.add_row(prompt, "\n".join(a), "\n".join(b))
    Console().print(table)
