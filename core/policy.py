"""`HFPolicy`: a Hugging Face causal LM as a pref `Policy`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from pref.errors import ModelNotLoaded
from pref.examples import Prompt
from pref.interfaces import Policy, Samples, SamplingConfig
from pref.models import answer_end_id, completion_token_ids, conversation_token_ids, load_model, load_tokenizer, prompt_token_ids
from pref.sequences import Logps, OutputHead, Sequences, model_hidden, model_logps, output_head
from pref.sharding import gathered_for_generation, is_sharded


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel (or similar) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _padded(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """[len(rows), longest row] token rows, filled out with `value` on the right (or the left)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


#: Every logits processor a model's generation config may switch on, neutral: transformers fills what a `generate` call leaves
#: unset from that config (Qwen2.5-Instruct's repetition_penalty 1.05, for one), and samples must come from the very
#: distribution the objectives' log-probs score.
AS_THE_POLICY = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}
SAMPLED_AS_THE_POLICY = {**AS_THE_POLICY, "typical_p": 1.0, "min_p": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}  # sampling's own


def sampled_ids(row: list[int], stops: list[int]) -> list[int]:
    """A generated row's completion: its ids up to and including the first stop token (the padding after it dropped), else all."""
    end = next((i for i, token in enumerate(row) if token in stops), None)
    return row if end is None else row[: end + 1]


class HFPolicy(Policy):
    """A `transformers` causal LM and its tokenizer.

    `model` may be replaced by a wrapped model (DDP from accelerate); training
    forward passes go through it so gradients synchronise, while generation
    and saving use the bare model. It is None until `load_model`: a run reads
    its datasets with the tokenizer alone, before the slow model load.
    """

    def __init__(self, model: torch.nn.Module | None, tokenizer: Any, max_length: int = 512, max_prompt_length: int = 256, packing: bool = False,
                 sample_sharded: bool = False, template_options: dict[str, Any] | None = None):
        self._model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = min(max_prompt_length, max_length - 1)  # a prompt leaves an answer token within max_length
        self.packing = packing  # lean log-probs through packed forwards (pref.packing)
        self.sample_sharded = sample_sharded  # a sharded model samples gathering one layer at a time (pref.sharding.gathered_for_generation)
        self.template_options = dict(template_options or {})  # the chat template's variables (--chat-template-option)
        self.answer_end = answer_end_id(tokenizer, self.template_options)  # the token an encoded answer ends with
        self._router_losses: list[torch.Tensor] | None = None  # collected inside `router_losses()`

    @classmethod
    def load(cls, name: str | None, dtype: torch.dtype | None = None, kind: str = "causal-lm", attention: str | None = None,
             **kwargs: Any) -> "HFPolicy":
        """Load a hub id or local path; `kind` "sequence-classifier" loads a one-score reward model."""
        policy = cls(None, load_tokenizer(name), **kwargs)
        policy.load_model(name, dtype, kind, attention)
        return policy

    def load_model(self, name: str | None, dtype: torch.dtype | None = None, kind: str = "causal-lm", attention: str | None = None,
                   quantize: str | None = None, device: Any = None) -> None:
        """Load the model `name` (as `load` does, with transformers' `attention` implementation, in 4 bits on `device` with
        `quantize`) into a policy made with its tokenizer alone."""
        self.model = load_model(name, dtype, kind, attention, quantize, device)
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

    def generate(self, prompts: list[Prompt], k: int, sampling: SamplingConfig) -> list[list[str]]:
        return self.sample(prompts, k, sampling).completions

    @property
    def stop_ids(self) -> list[int]:
        """The tokens that end a sampled answer: the tokenizer's EOS and each one the model's generation config declares,
        an end-of-turn token among them (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`), as TRL's trainers stop."""
        declared = unwrap(self.model).generation_config.eos_token_id
        ids = [self.tokenizer.eos_token_id, self.answer_end, *(declared if isinstance(declared, list) else [declared])]
        return [i for i in dict.fromkeys(ids) if i is not None]

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], k: int, sampling: SamplingConfig) -> Samples:
        """All P x K samples in one batched, KV-cached `generate` call: their text, and their rows of the ids sampled.

        A sharded model (FSDP) gathers its weights for the call (one layer at a time, each forward, with `sample_sharded`):
        every process must call this together.
        """
        model, stops = unwrap(self.model), self.stop_ids
        rows = [prompt_token_ids(self.tokenizer, p, self.template_options)[-self.max_prompt_length :] for p in prompts]
        ids = _padded(rows, self.tokenizer.pad_token_id, left=True).to(self.device)
        mask = _padded([[1] * len(r) for r in rows], 0, left=True).to(self.device)
        was_training = model.training
        model.eval()
        do_sample = sampling.temperature > 0
        copies, k = (1, k) if do_sample else (k, 1)  # greedy answers are all the same: decode one, repeat it
        with gathered_for_generation(model, whole=not self.sample_sharded):
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
                eos_token_id=stops,
                use_cache=True,
                **(SAMPLED_AS_THE_POLICY | ({"min_p": sampling.min_p} if sampling.min_p else {}) if do_sample else AS_THE_POLICY),
                synced_gpus=is_sharded(model),  # sharded, every process steps until all have ended: no gather is left waiting
            )
        model.train(was_training)
        answers = [sampled_ids(row, stops) for row in out[:, ids.shape[1] :].tolist()]
        texts = [t.strip() for t in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]
        order = [i * k + j % k for i in range(len(prompts)) for j in range(k * copies)]  # output row of each of the P x K samples
        width = k * copies
        completions = [[texts[o] for o in order[i * width : (i + 1) * width]] for i in range(len(prompts))]
        truncated = torch.tensor([not answers[o] or answers[o][-1] not in stops for o in order])
        return Samples(completions, self._sequences([rows[o // k] for o in order], [answers[o] for o in order]), truncated)

    def encode(self, prompts: list[Prompt], completions: list[str], max_prompt_length: int | None = None) -> Sequences:
        """Right-padded prompt+completion rows; the completion mask covers the answer and the token that ends it (`answer_end_id`)."""
        keep = max_prompt_length or self.max_prompt_length
        prompt_rows = [prompt_token_ids(self.tokenizer, p, self.template_options)[-keep:] for p in prompts]
        return self._sequences(prompt_rows, [completion_token_ids(self.tokenizer, c, self.answer_end) for c in completions])

    def encode_conversations(self, conversations: list[list[dict]]) -> Sequences:
        """Right-padded rows of whole conversations, cut at `max_length`; the completion mask on each answer (`conversation_token_ids`)."""
        rows = [conversation_token_ids(self.tokenizer, c, self.template_options, self.answer_end) for c in conversations]
        ids, masks = [r[: self.max_length] for r, _ in rows], [m[: self.max_length] for _, m in rows]
        return Sequences(_padded(ids, self.tokenizer.pad_token_id), _padded([[1] * len(r) for r in ids], 0), _padded(masks, 0))

    def _sequences(self, prompt_rows: list[list[int]], completion_rows: list[list[int]]) -> Sequences:
        """Prompt+completion id rows, right-padded; a completion is cut to fit `max_length` but keeps one token."""
        rows, masks = [], []
        for p, c in zip(prompt_rows, completion_rows):
            c = c[: max(1, self.max_length - len(p))]
            rows.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
        return Sequences(_padded(rows, self.tokenizer.pad_token_id), _padded([[1] * len(r) for r in rows], 0), _padded(masks, 0))

    def logps(self, sequences: Sequences, with_logits: bool = False, with_hidden: bool = False, with_entropy: bool = False,
              temperature: float = 1.0) -> Logps:
        routed = self._router_losses is not None and torch.is_grad_enabled()
        out = model_logps(self.model, sequences.to(self.device), with_logits, with_hidden, packing=self.packing, with_entropy=with_entropy,
                          with_router_loss=routed, temperature=temperature)
        if routed:
            self._router_losses.append(out.router_loss)
        return out

    def hidden_states(self, sequences: Sequences) -> torch.Tensor:
        routed = self._router_losses is not None and torch.is_grad_enabled()
        hidden, router_loss = model_hidden(self.model, sequences.to(self.device), with_router_loss=routed)
        if routed:
            self._router_losses.append(router_loss)
        return hidden

    def output_head(self) -> OutputHead:
        return output_head(self.model)

    @contextmanager
    def router_losses(self) -> Iterator[list[torch.Tensor]]:
        """The load-balancing loss (`Logps.router_loss`) of each forward with grad made inside: the training loop adds their
        mean to an objective's loss when the model is a Mixture of Experts (`pref.sequences.router_loss_coef`)."""
        self._router_losses = collected = []
        try:
            yield collected
        finally:
            self._router_losses = None

    def save(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The model (its weights from `state_dict` where given: a sharded model's, gathered whole) and the tokenizer."""
        unwrap(self.model).save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
