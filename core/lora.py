"""LoRA through `peft`: adapters on a frozen base, its reference with them switched off.

A LoRA run trains small low-rank adapters (and, for a sequence classifier, its score
head) while the base weights stay frozen; the reference is the same model with the
adapters disabled, so no second copy of the weights is held. `final/` holds the
adapter in PEFT's format; `--merge-lora` also writes `final/merged/`, full weights
that plain `transformers` loads.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from pref.errors import PrefError, unknown_name
from pref.interfaces import Reference
from pref.reference import FrozenReference
from pref.sequences import Logps, Sequences

ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged"


@dataclass
class LoraOptions:
    """`--lora-option KEY=VALUE` / the `[lora]` table of a config file."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # comma-separated names, or peft's "all-linear"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoraOptions":
        names = {f.name for f in fields(cls)}
        for key in values:
            if key not in names:
                raise unknown_name("LoRA option", key, names, hint=" (e.g. --lora-option r=16)")
        options = cls(**values)
        if not isinstance(options.r, int) or isinstance(options.r, bool) or options.r < 1:
            raise PrefError(f"LoRA option r must be a positive whole number, not {options.r!r}")
        if not isinstance(options.alpha, (int, float)) or options.alpha <= 0:
            raise PrefError(f"LoRA option alpha must be a positive number, not {options.alpha!r}")
        if not isinstance(options.dropout, (int, float)) or not 0 <= options.dropout < 1:
            raise PrefError(f"LoRA option dropout must be from 0 to below 1, not {options.dropout!r}")
        if isinstance(options.target_modules, str):
            parts = [p.strip() for p in options.target_modules.split(",") if p.strip()]
            options.target_modules = parts[0] if parts == ["all-linear"] else parts
        if not options.target_modules:
            raise PrefError("LoRA option target_modules is empty; name modules like q_proj,v_proj or use all-linear")
        return options


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise PrefError("--lora needs the peft package: pip install peft") from None
    return peft


def add_adapters(model: torch.nn.Module, options: LoraOptions, kind: str = "causal-lm") -> torch.nn.Module:
    """Wrap `model` in a `peft` LoRA model: only the adapters (and a classifier's score head) train."""
    peft = require_peft()
    task = "SEQ_CLS" if kind == "sequence-classifier" else "CAUSAL_LM"
    config = peft.LoraConfig(
        task_type=task, r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=options.target_modules,
        # the score head of a reward model is new: it trains in full and is saved with the adapter
        modules_to_save=["score"] if kind == "sequence-classifier" else None,
    )
    try:
        with quiet_peft():
            return peft.get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise PrefError(f"cannot add LoRA adapters: {str(exc).splitlines()[0]}; this model's linear layers are {', '.join(names)}") from None


@contextmanager
def quiet_peft() -> Iterator[None]:
    """No FutureWarning from peft asking transformers 5 for a renamed attribute (`is_gradient_checkpointing`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_lora(model: torch.nn.Module) -> bool:
    while hasattr(model, "module") and not hasattr(model, "disable_adapter"):
        model = model.module
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The base model inside: a LoRA model's adapters switched off (nothing for other models)."""
    while hasattr(model, "module") and not hasattr(model, "disable_adapter"):
        model = model.module
    if not is_lora(model):
        yield
        return
    with model.disable_adapter():
        yield


class AdaptersOffReference(Reference):
    """A LoRA run's reference: the policy's own model with its adapters switched off."""

    has_logits = True

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.frozen = FrozenReference(model)

    def logps(self, sequences: Sequences, with_logits: bool = False) -> Logps:
        with adapters_off(self.model):
            return self.frozen.logps(sequences, with_logits)


def save_merged(model: torch.nn.Module, tokenizer: Any, path: str) -> None:
    """Full weights with the adapters folded in, loadable by plain `transformers`, and the tokenizer.

    The merge runs on a copy, so the trained model keeps its adapters.
    """
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), ADAPTER_CONFIG))


def load_adapter_model(path: str, dtype: torch.dtype, kind: str = "causal-lm") -> torch.nn.Module:
    """A saved adapter folder (PEFT format) on its base model, ready for sampling and scoring."""
    peft = require_peft()
    auto = peft.AutoPeftModelForSequenceClassification if kind == "sequence-classifier" else peft.AutoPeftModelForCausalLM
    try:
        with quiet_peft():
            return auto.from_pretrained(os.path.expanduser(path), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise PrefError(f"cannot load the LoRA adapter in {path}: {str(exc).splitlines()[0]}") from None
