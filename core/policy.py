"""`HFPolicy`: a Hugging Face causal LM as a pref `Policy`."""

from __future__ import annotations

from typing import Any

import torch

from pref.errors import ModelNotLoaded
from pref.examples import Prompt
from pref.interfaces import Policy, SamplingConfig
from pref.models import completion_token_ids, load_model, load_tokenizer, prompt_token_ids
from pref.sequences import Logps, Sequences, model_logps


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel (or similar) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _padded(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """[len(rows), longest row] token rows, filled out with `value` on the right (or the left)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


class HFPolicy(Policy):
    """A `transformers` causal LM and its tokenizer.

    `model` may be replaced by a wrapped model (DDP from accelerate); training
    forward passes go through it so gradients synchronise, while generation
    and saving use the bare model. It is None until `load_model`: a run reads
    its datasets with the tokenizer alone, before the slow model load.
    """

    def __init__(self, model: torch.nn.Module | None, tokenizer: Any, max_length: int = 512, max_prompt_length: int = 256, packing: bool = False):
        self._model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.packing = packing  # lean log-probs through packed forwards (pref.packing)

    @classmethod
    def load(cls, name: str | None, dtype: torch.dtype | None = None, kind: str = "causal-lm", **kwargs: Any) -> "HFPolicy":
        """Load a hub id or local path; `kind` "sequence-classifier" loads a one-score reward model."""
        policy = cls(None, load_tokenizer(name), **kwargs)
        policy.load_model(name, dtype, kind)
        return policy

    def load_model(self, name: str | None, dtype: torch.dtype | None = None, kind: str = "causal-lm") -> None:
        """Load the model `name` (as `load` does) into a policy made with its tokenizer alone."""
        self.model = load_model(name, dtype, kind)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id  # sequence classifiers find the last token by it

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:  # the datasets are read before it loads: a builder that samples is built again after
            raise ModelNotLoaded("the policy's model is not loaded yet; call policy.load_model(name) first")
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self._model = model

    @property
    def device(self) -> torch.device:
        return next(unwrap(self.model).parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], k: int, sampling: SamplingConfig) -> list[list[str]]:
        """All P x K samples in one batched, KV-cached `generate` call."""
        model = unwrap(self.model)
        rows = [prompt_token_ids(self.tokenizer, p)[-self.max_prompt_length :] for p in prompts]
        ids = _padded(rows, self.tokenizer.pad_token_id, left=True).to(self.device)
        mask = _padded([[1] * len(r) for r in rows], 0, left=True).to(self.device)
        was_training = model.training
        model.eval()
        do_sample = sampling.temperature > 0
        copies, k = (1, k) if do_sample else (k, 1)  # greedy answers are all the same: decode one, repeat it
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=do_sample,
            temperature=sampling.temperature if do_sample else None,
            top_p=sampling.top_p if do_sample else None,
            top_k=sampling.top_k if do_sample else None,
            num_return_sequences=k,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
        )
        model.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * k : (i + 1) * k] * copies for i in range(len(prompts))]

    def encode(self, prompts: list[Prompt], completions: list[str]) -> Sequences:
        """Right-padded prompt+completion rows; the completion mask covers the answer and its EOS."""
        rows, masks = [], []
        for prompt, completion in zip(prompts, completions):
            p = prompt_token_ids(self.tokenizer, prompt)[-self.max_prompt_length :]
            c = completion_token_ids(self.tokenizer, completion)[: max(1, self.max_length - len(p))]
            rows.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
        return Sequences(_padded(rows, self.tokenizer.pad_token_id), _padded([[1] * len(r) for r in rows], 0), _padded(masks, 0))

    def logps(self, sequences: Sequences, with_logits: bool = False, with_hidden: bool = False) -> Logps:
        return model_logps(self.model, sequences.to(self.device), with_logits, with_hidden, packing=self.packing)

    def save(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The model (its weights from `state_dict` where given: a sharded model's, gathered whole) and the tokenizer."""
        unwrap(self.model).save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
