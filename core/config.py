"""The run configuration: defaults, a TOML, YAML or JSON file, then command-line flags."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from pref.errors import PrefError, expected_type, unknown_name


@dataclass
class RunConfig:
    """Everything a `pref run` needs. Field names are the config-file keys."""

    objective: str = "divpo"
    objective_options: dict[str, Any] = field(default_factory=dict)
    dataset: list[str] = field(default_factory=list)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    reward: str | list[str] | None = None  # one reward's name, or several names (their weighted sum)
    reward_options: dict[str, Any] = field(default_factory=dict)  # several rewards: "NAME.key" keys, or NAME -> options
    reward_weights: list[float] | None = None  # one weight per reward when several (default 1 each)
    selector: str | None = None
    selector_options: dict[str, Any] = field(default_factory=dict)
    embedder: str | None = None
    embedder_options: dict[str, Any] = field(default_factory=dict)

    model: str | None = None
    trust_remote_code: bool = False  # models and tokenizers may run the Python code they ship (pref.models.remote_code)
    reference: str = "auto"  # auto | model | cached | none
    reference_model: str | None = None  # the reference is this model, not the starting policy (TRL's ref_model; distill's teacher)
    output_dir: str | None = None  # None: the run folder of `resume`, else runs/OBJECTIVE-TIMESTAMP
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    mixed_precision: str = "no"  # no | fp16 | bf16
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32: the weights as loaded (pref.precision)
    gradient_checkpointing: bool = False
    activation_offloading: bool = False  # the activations kept for the backward wait in CPU memory (pref.offload)
    cast_lm_head_to_fp32: bool = False  # the LM head's weights and logits in float32 (pref.precision.head_in_float32)
    attn_implementation: str | None = None  # transformers' attention kernel: sdpa (its default), eager, flash_attention_2, ...
    fsdp: bool = False  # shard the model over the processes with torch's FSDP2 (pref.sharding)
    sample_sharded: bool = False  # --fsdp: sample gathering one layer at a time, not the whole model for each generate call
    adapter: str | None = None  # a registered adapter (register_adapters) trained instead of every weight; `lora` (--lora) is pref's own
    adapter_options: dict[str, Any] = field(default_factory=dict)
    merge_lora: bool = False  # also write final/merged/: full weights with the adapter folded in
    quantize: str | None = None  # nf4 | fp4: the base model's linear layers loaded in 4 bits (bitsandbytes), an adapter trained on it (QLoRA)
    threads: int | None = None  # CPU threads of torch; None: EMBEDDED_MODEL_THREADS for the embedded default model, else torch's own

    steps: int = 400
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR, or EMBEDDED_MODEL_LR for the embedded default model
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    router_aux_loss_coef: float | None = None  # a Mixture-of-Experts model's load-balancing loss weight; None: its config's (TRL's default)
    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: str | None = None  # a Jinja file, or a model whose tokenizer's chat template replaces the model's own
    chat_template_options: dict[str, Any] = field(default_factory=dict)  # the chat template's variables: enable_thinking = false (Qwen3), ...
    bucket_window: int | None = None  # offline: the sampler "length-buckets" with this window; None: 50 (pref.plan.PLAN_DEFAULTS); 0: plain shuffle
    packing: bool = True  # lean log-prob forwards pack rows back to back without padding (pref.packing)

    samples_per_prompt: int | None = None  # None: the objective's own K
    max_new_tokens: int | None = None  # None: the reward's own (RewardSource.max_new_tokens), else DEFAULT_MAX_NEW_TOKENS
    # None: 1.0, 1.0, 0 (pref.plan.PLAN_DEFAULTS); a run that samples nothing refuses them given
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # None: 0.0, off (pref.plan.PLAN_DEFAULTS)

    log_every: int = 1
    log_completions: bool = False  # online: the samples each logged step drew (prompts, completions, scores) to the loggers: completions.jsonl
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    progress: bool = True  # the logger "progress" (a bar on stderr) besides --logger's
    save_every: int = 0  # 0: only the final model
    eval_every: int = 0  # 0: evaluate at the last step done only (when there is something to evaluate)
    validation_split: float = 0.0  # share of each dataset held out for the validation loss
    validation_dataset: list[str] = field(default_factory=list)  # held-out data instead of a split
    test_prompts: list[str] = field(default_factory=list)  # answered at each evaluation, in generations.jsonl (the evaluator test-prompts)
    evaluator: str | None = None  # a registered evaluator (register_evaluators) run at each evaluation, besides pref's own
    evaluator_options: dict[str, Any] = field(default_factory=dict)
    curriculum: bool = False  # sample the datasets by the automatic curriculum: the sampler "curriculum" (pref.plugins.curriculum)
    curriculum_options: dict[str, Any] = field(default_factory=dict)
    sampler: str | None = None  # a registered sampler (register_samplers) choosing which records come next; None: shuffled
    sampler_options: dict[str, Any] = field(default_factory=dict)
    keep_checkpoints: int = 2
    resume: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Peak learning rates when none is given: small for real pretrained models,
#: large for the tiny embedded default, which a few hundred steps must visibly move
#: without collapsing it onto a few answers (bench/divpo_nouns.py).
DEFAULT_LR = 1e-6
EMBEDDED_MODEL_LR = 5e-4
#: The embedded default model's matrices (hidden size 96) are too small for a second
#: thread to pay for itself. A DivPO step on 2 idle cores took 0.059 s on one thread and
#: 0.053 s on two (the same run time: 16 s for 100 steps); on 2 cores that other jobs kept
#: busy it took 0.07 s on one and 0.27 s on two, and the run 5x the CPU time.
EMBEDDED_MODEL_THREADS = 1
#: New tokens per online sample when neither the run nor the reward sets it.
DEFAULT_MAX_NEW_TOKENS = 32

CHOICES = {
    "reference": ("auto", "model", "cached", "none"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "schedule": ("cosine", "linear", "constant"),
}
QUANTIZATIONS = ("nf4", "fp4")  # --quantize: bitsandbytes' 4-bit types (nf4: QLoRA's)
POSITIVE = ("steps", "batch_size", "grad_accum", "max_length", "max_prompt_length", "log_every", "keep_checkpoints")
POSITIVE_OR_NONE = ("max_new_tokens", "threads")  # None: resolved later (see RunConfig)
ZERO_OR_MORE = ("save_every", "eval_every", "warmup_steps", "bucket_window", "top_k")  # 0: off
RESOLVED_LATER = (*POSITIVE_OR_NONE, "bucket_window", "top_k")  # None: resolved by the plan (see RunConfig)
TRUE_OR_FALSE = ("fsdp", "sample_sharded", "packing", "cast_lm_head_to_fp32", "log_completions", "activation_offloading")


def read_config_file(path: str) -> dict[str, Any]:
    """Parse a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file into a dict."""
    if not os.path.exists(path):
        raise PrefError(f"config file {path} does not exist; pass the path of a .toml, .yaml or .json file")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                return tomllib.load(f)
        if path.endswith((".yaml", ".yml", ".json")):
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f) if path.endswith(".json") else read_yaml(f) or {}  # an empty YAML file sets nothing
            if not isinstance(data, dict):
                raise PrefError(f"config file {path} must hold a mapping of keys to values")
            return data
    except PrefError:
        raise
    except Exception as exc:
        raise PrefError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    raise PrefError(f"config file {path} must end in .toml, .yaml, .yml or .json")


def read_yaml(stream: Any) -> Any:
    """YAML text or a file into Python values, `1e-6` read as the number it is meant to be.

    PyYAML follows YAML 1.1, where a float needs a dot: plain `safe_load` reads `lr: 1e-6` or
    `-o beta=1e-3` as the string "1e-6".
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return yaml.load(stream, Loader=Loader)


def build_config(file_values: dict[str, Any] | None = None, flags: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, overridden by the config file, overridden by flags. Unknown keys are errors."""
    hints = typing.get_type_hints(RunConfig)
    values: dict[str, Any] = {}
    for source in (file_values or {}, flags or {}):
        for key, value in lora_as_adapter(source).items():
            if key not in hints:
                raise unknown_name("config key", key, hints, hint=" (keys are `pref run` flag names)")
            if isinstance(value, str) and hints[key] == list[str]:  # one name or text where a list of them goes: `loggers = "jsonl"`
                value = [value]
            value = list(value) if isinstance(value, tuple) else value  # click's repeated flags, a library caller's tuple
            value = reward_names(value) if key == "reward" else reward_weights(value) if key == "reward_weights" else value
            wanted = expected_type(value, hints[key])
            if wanted:  # a config file's value or a run.json's; the flags' click has typed
                raise PrefError(f"{key} must be {wanted}, not {value!r}")
            if key.endswith("_options"):
                values[key] = {**values.get(key, {}), **value}
            else:
                values[key] = value
    config = RunConfig(**values)
    from pref.models import DEFAULT_MODEL  # lazily: it imports torch

    embedded = config.model in (None, "", DEFAULT_MODEL)
    if config.lr is None:
        config.lr = EMBEDDED_MODEL_LR if embedded else DEFAULT_LR
    if config.threads is None and embedded:
        config.threads = EMBEDDED_MODEL_THREADS
    validate(config)
    return config


def lora_as_adapter(source: dict[str, Any]) -> dict[str, Any]:
    """One source's keys (dashes as underscores), its LoRA keys as the general ones: `lora = true` (--lora) is
    `adapter = "lora"`, `lora = false` no adapter, `lora_options` and a `[lora]` table (LoRA on) are `adapter_options`."""
    source = {key.replace("-", "_"): value for key, value in source.items()}
    lora, options = source.pop("lora", None), source.pop("lora_options", None)
    if lora is not None and not isinstance(lora, (bool, dict)):
        raise PrefError(f"lora must be true or false (or a [lora] table of its options), not {lora!r}")
    if isinstance(lora, dict):
        lora, options = True, {**(options or {}), **lora}
    if lora and source.get("adapter") not in (None, "lora"):
        raise PrefError(f"--lora is --adapter lora: give one of --lora and --adapter {source['adapter']}")
    if lora is not None:
        source["adapter"] = "lora" if lora else source.get("adapter")
    if options is not None:
        source["adapter_options"] = {**options, **source.get("adapter_options", {})}
    return source


def reward_names(value: Any) -> str | list[str] | None:
    """`reward` as a config holds it: one name stays a string (as before several were allowed), several a list."""
    names = [value] if isinstance(value, str) else list(value or [])
    if not all(isinstance(name, str) and name for name in names):
        raise PrefError(f"reward must be a reward's name or a list of names, not {value!r}")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise PrefError(f"reward {duplicated[0]!r} is given twice; name each reward once and weigh it with --reward-weights")
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def reward_weights(value: Any) -> list[float] | None:
    """`--reward-weights 1,0.5` or a list of numbers into finite floats; a one-line error otherwise."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    weights = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            weight = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise PrefError(f"reward_weights must be numbers separated by commas, e.g. 1,0.5; {item!r} is not a number") from None
        if not math.isfinite(weight):
            raise PrefError(f"reward_weights must be finite numbers, not {item!r}")
        weights.append(weight)
    return weights


def validate(config: RunConfig) -> None:
    for key, choices in CHOICES.items():
        value = getattr(config, key)
        if value not in choices:
            raise PrefError(f"{key} must be one of {', '.join(choices)}, not {value!r}")
    for key in POSITIVE + POSITIVE_OR_NONE + ZERO_OR_MORE:
        value, least = getattr(config, key), 0 if key in ZERO_OR_MORE else 1
        if value is not None or key not in RESOLVED_LATER:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                what = "zero or positive (a whole number; 0 is off)" if least == 0 else "a positive whole number"
                raise PrefError(f"{key} must be {what}, not {value!r}")
    for key in TRUE_OR_FALSE:
        if not isinstance(getattr(config, key), bool):
            raise PrefError(f"{key} must be true or false, not {getattr(config, key)!r}")
    if config.max_length < 2:
        raise PrefError(f"max_length must be 2 or more (a prompt token and an answer token), not {config.max_length}")
    if config.samples_per_prompt is not None and (not isinstance(config.samples_per_prompt, int) or config.samples_per_prompt < 1):
        raise PrefError(f"samples_per_prompt must be 1 or more, not {config.samples_per_prompt!r}")
    if config.temperature is not None and (not 0 <= config.temperature or isinstance(config.temperature, bool)):
        raise PrefError(f"temperature must be zero (greedy) or positive, not {config.temperature!r}")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise PrefError(f"top_p must be above 0 and at most 1, not {config.top_p!r}")
    if config.min_p is not None and not 0 <= config.min_p < 1:
        raise PrefError(f"min_p must be at least 0 (off) and below 1, not {config.min_p!r}")
    if config.attn_implementation is not None and not (isinstance(config.attn_implementation, str) and config.attn_implementation):
        raise PrefError(f"attn_implementation must name one of transformers' attention implementations (sdpa, eager, flash_attention_2, ...), "
                        f"not {config.attn_implementation!r}")
    if not config.weight_decay >= 0:
        raise PrefError(f"weight_decay must be zero or positive, not {config.weight_decay!r}")
    if config.router_aux_loss_coef is not None and not config.router_aux_loss_coef >= 0:
        raise PrefError(f"router_aux_loss_coef must be zero (off) or positive, not {config.router_aux_loss_coef!r}")
    if config.reward_weights is not None:
        names = config.reward if isinstance(config.reward, list) else [config.reward] if config.reward else []
        if len(names) < 2:
            raise PrefError("reward_weights weigh several rewards against each other: pass --reward twice or more, or drop --reward-weights")
        if len(config.reward_weights) != len(names):
            raise PrefError(f"{len(config.reward_weights)} reward weights for {len(names)} rewards ({', '.join(names)}): give one weight per --reward, in order")
    if config.adapter_options and not config.adapter:  # the plan checks the options themselves
        raise PrefError("adapter options were given without --lora or --adapter NAME; add one (or a [lora] table in the config file)")
    if config.merge_lora and not config.adapter:
        raise PrefError("--merge-lora needs --lora (or --adapter NAME)")
    if config.quantize is not None and config.quantize not in QUANTIZATIONS:
        raise PrefError(f"quantize must be one of {', '.join(QUANTIZATIONS)} (4-bit types of bitsandbytes), not {config.quantize!r}")
    if config.quantize and not config.adapter:
        raise PrefError(f"--quantize {config.quantize} loads the base model in 4 bits, which cannot be trained in full: add --lora (or --adapter NAME)")
    if config.cast_lm_head_to_fp32 and config.fsdp:  # FSDP2 gathers every weight of the root in one dtype
        raise PrefError("--cast-lm-head-to-fp32 does not work with --fsdp, which computes the sharded LM head in the model's dtype; drop one of them")
    if config.quantize and config.fsdp:
        raise PrefError("--fsdp cannot shard 4-bit weights: drop --fsdp (each process then holds the whole 4-bit base) or --quantize")
    if not config.lr > 0:
        raise PrefError(f"lr must be positive, not {config.lr!r}")
    if not 0 <= config.validation_split < 1:
        raise PrefError(f"validation_split must be a share from 0 to below 1, not {config.validation_split!r}")
    if config.validation_split and config.validation_dataset:
        raise PrefError("give --validation-split or --validation-dataset, not both")
    if config.validation_split and not config.dataset:
        raise PrefError("--validation-split needs a --dataset to hold records out of")
    if config.curriculum and config.sampler:
        raise PrefError("--curriculum is --sampler curriculum: give one of --curriculum or --sampler, not both")
    if config.sampler_options and not config.sampler:
        raise PrefError("sampler options were given without --sampler; add --sampler NAME")
    if config.curriculum_options and not config.curriculum:
        raise PrefError("curriculum options were given without --curriculum; add --curriculum (with --sampler curriculum, pass them as --sampler-option)")
    if config.evaluator_options and not config.evaluator:
        raise PrefError("evaluator options were given without --evaluator; add --evaluator NAME")
    if config.curriculum and len(config.dataset) < 2:
        raise PrefError("--curriculum needs two or more --dataset entries to choose between")
