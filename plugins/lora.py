"""The built-in adapter `lora`: low-rank adapters through `peft` (`--lora`, or `--adapter lora`).

A plugin of the adapter kind (`register_adapters`, see docs/plugins.md). A LoRA run
trains small low-rank matrices (and a reward model's new score head) while the base
weights stay frozen. The loop does the rest as for any adapter: the reference is the
model with the adapter switched off, `final/` holds the adapter in PEFT's format, and
`--merge-lora` also writes `final/merged/`.
"""

from __future__ import annotations

import torch

from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.interfaces import Adapter
from pref.models import SCORE_HEAD


class Lora(Adapter):
    """LoRA (peft): low-rank adapters on linear layers; options r, alpha, dropout, target_modules."""

    def __init__(self, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules: str | list[str] = "all-linear"):
        """`target_modules`: layer names, as a list or comma-separated (`q_proj,v_proj`), or peft's `all-linear`."""
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise PrefError(f"LoRA option r must be a positive whole number, not {r!r}")
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise PrefError(f"LoRA option alpha must be a positive number, not {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise PrefError(f"LoRA option dropout must be from 0 to below 1, not {dropout!r}")
        if isinstance(target_modules, str):
            parts = [p.strip() for p in target_modules.split(",") if p.strip()]
            target_modules = parts[0] if parts == ["all-linear"] else parts
        if not target_modules:
            raise PrefError("LoRA option target_modules is empty; name modules like q_proj,v_proj or use all-linear")
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules

    def wrap(self, model: torch.nn.Module, kind: str) -> torch.nn.Module:
        import peft

        classifier = kind == "sequence-classifier"
        config = peft.LoraConfig(
            task_type="SEQ_CLS" if classifier else "CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=self.target_modules,
            # the score head of a reward model is new: it trains in full and is saved with the adapter
            modules_to_save=[SCORE_HEAD] if classifier else None,
        )
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise PrefError(f"cannot add LoRA adapters: {str(exc).splitlines()[0]}; this model's linear layers are {', '.join(names)}") from None


@hookimpl
def register_adapters(register):
    register("lora", Lora)
