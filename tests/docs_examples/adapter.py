"""The `ia3` adapter: IA3 through peft, which learns one scale per channel instead of low-rank matrices."""

from __future__ import annotations

import torch

from pref import Adapter, PrefError, hookimpl


class IA3(Adapter):
    """IA3 (peft): learned scales of chosen layers' activations, a few thousand weights.

    Options:
        target_modules: the layers whose outputs (or, for feed-forward ones, inputs) are scaled.
        feedforward_modules: which of them are feed-forward layers.
    """

    def __init__(self, target_modules: str = "k_proj,v_proj,down_proj", feedforward_modules: str = "down_proj"):
        self.target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
        self.feedforward_modules = [name.strip() for name in feedforward_modules.split(",") if name.strip()]
        if not set(self.feedforward_modules) <= set(self.target_modules):
            raise PrefError("ia3: every one of feedforward_modules must be in target_modules too")

    def wrap(self, model: torch.nn.Module, kind: str) -> torch.nn.Module:
        import peft

        classifier = kind == "sequence-classifier"
        config = peft.IA3Config(
            task_type="SEQ_CLS" if classifier else "CAUSAL_LM", target_modules=self.target_modules,
            feedforward_modules=self.feedforward_modules, modules_to_save=["score"] if classifier else None,
        )
        return peft.get_peft_model(model, config)  # switched off for the reference, merged by `Adapter`'s peft defaults


@hookimpl
def register_adapters(register):
    register("ia3", IA3)
