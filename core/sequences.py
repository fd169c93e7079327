"""Token rows and the log-probs computed over them."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from pref.errors import PrefError
from pref.packing import config_of, packed_layout


@dataclass
class Sequences:
    """B prompt+completion rows, right padded.

    input_ids:       [B, T] token ids
    attention_mask:  [B, T] 1 on real tokens, 0 on padding
    completion_mask: [B, T] 1 on completion tokens only (prompt and padding are 0)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Sequences":
        return Sequences(*(t.to(device) for t in vars(self).values()))

    def select(self, index: torch.Tensor | list[int]) -> "Sequences":
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return Sequences(*(t[index] for t in vars(self).values()))

    def keys(self) -> list[str]:
        """A content hash per row (the real tokens and which are completion), for caches."""
        rows = zip(self.input_ids.tolist(), self.attention_mask.tolist(), self.completion_mask.tolist())
        real = ([(i, c) for i, a, c in zip(ids, att, comp) if a] for ids, att, comp in rows)
        return [hashlib.sha1(repr(r).encode()).hexdigest() for r in real]

    @staticmethod
    def concat(parts: list["Sequences"], pad_id: int = 0) -> "Sequences":
        """Stack rows of several `Sequences`, right-padding to the longest."""
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Sequences(
            torch.cat([pad(p.input_ids, pad_id) for p in parts]),
            torch.cat([pad(p.attention_mask, 0) for p in parts]),
            torch.cat([pad(p.completion_mask, 0) for p in parts]),
        )


@dataclass
class Logps:
    """Log-probs of the completion tokens of some `Sequences`.

    tokens:   [B, T] log p(token_t | tokens_<t), 0 where `mask` is 0
    mask:     [B, T] the completion mask the log-probs were taken over
    sequence: [B]    sum of `tokens` over the completion
    logits:   [B, T, V] or None; logits[:, t] predicts token t (row 0 is unused)
    hidden:   [B, T, H] or None; the last layer's hidden state at each position
    entropy:  [B, T] or None; the entropy of the distribution each completion token was drawn from, 0 elsewhere
    router_loss: [] or None; a Mixture-of-Experts model's load-balancing loss over the forward's real tokens (of all B rows)
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    sequence: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """Per-token average log-prob [B]."""
        return self.sequence / self.mask.sum(-1).clamp(min=1)

    def select(self, index: torch.Tensor | slice) -> "Logps":
        """These rows' values (without `router_loss`, which belongs to the whole forward)."""
        rows = (self.tokens, self.mask, self.sequence, self.logits, self.hidden, self.entropy)
        return Logps(*(None if t is None else t[index] for t in rows))


def logps_from_logits(logits: torch.Tensor, sequences: Sequences, keep_logits: bool = False, temperature: float = 1.0) -> Logps:
    """Gather the log-prob of each completion token from a model's logits.

    logits: [B, T, V], where logits[:, t] predicts token t + 1 (the usual causal LM output).
    Returns `Logps` aligned to token positions: tokens[:, t] is log p(input_ids[:, t]), p = softmax(logits / temperature);
    `keep_logits` keeps the logits as given.
    """
    ids = sequences.input_ids
    mask = sequences.completion_mask.clone()
    mask[:, 0] = 0  # the first token has no prefix to be predicted from
    shifted = logits[:, :-1].float()
    if temperature != 1.0:  # no second [B, T, V] tensor at 1
        shifted = shifted / temperature
    # gather-then-normalise: avoids materialising a second [B, T, V] log-softmax tensor
    picked = torch.gather(shifted, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(shifted, dim=-1)
    token_logps = torch.nn.functional.pad(token_logps, (1, 0), value=0.0) * mask
    aligned_logits = torch.nn.functional.pad(logits[:, :-1], (0, 0, 1, 0)) if keep_logits else None
    return Logps(token_logps, mask, token_logps.sum(-1), aligned_logits)


#: Logit elements (rows x vocabulary) computed at once by `lean_logps`: 2**24 float32
#: values are 64 MiB, e.g. 110 positions of a 151k vocabulary or 1024 of a 16k one.
LOGIT_CHUNK_ELEMENTS = 2**24


def _inside_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """`model` out of DDP-like wrappers (their forward synchronises); PEFT and FSDP wrappers pass the LM through and stay."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    return model


def model_logps(model: torch.nn.Module, sequences: Sequences, with_logits: bool = False, with_hidden: bool = False,
                packing: bool = False, with_entropy: bool = False, with_router_loss: bool = False, temperature: float = 1.0) -> Logps:
    """Log-probs of `sequences`' completion tokens under a causal LM (possibly wrapped by DDP or PEFT).

    With `with_logits` the model computes the full [B, T, V] logits (the plain path);
    otherwise the LM head runs only at completion positions, a chunk at a time (`lean_logps`).
    `with_hidden` adds the LM head's input [B, T, H] (the last hidden states, after the final norm), `with_entropy`
    each completion token's next-token entropy [B, T] (with grad as the log-probs; in the lean path from the same chunks),
    `with_router_loss` a Mixture-of-Experts model's load-balancing loss, as its own forward computes it (`router_loss`).
    Log-probs and entropies are those of softmax(logits / `temperature`): of the distribution samples were drawn from at it.
    With `packing` the lean path packs the rows into fewer rows without padding when that
    saves rows and the model passed its probe (`pref.packing`); the values are the same.
    The forward pass always goes through `model` itself, once, so a DDP wrapper synchronises gradients.
    """
    if packing and not with_logits and not with_hidden:
        packed = packed_logps(model, sequences, with_entropy, with_router_loss, temperature)
        if packed is not None:
            return packed
    head = _inside_ddp(model).get_output_embeddings() if with_hidden or not with_logits else None
    routed = {"output_router_logits": True} if with_router_loss else {}
    out, hidden = forward_with_head_input(model, head, shrink=not with_logits, input_ids=sequences.input_ids,
                                          attention_mask=sequences.attention_mask, **routed)
    if with_logits:
        logps = logps_from_logits(out.logits, sequences, keep_logits=True, temperature=temperature)
        if with_entropy:  # the distribution at position t - 1 drew token t
            distributions = torch.log_softmax(out.logits[:, :-1].float() / temperature if temperature != 1.0 else out.logits[:, :-1].float(), -1)
            logps.entropy = torch.nn.functional.pad(-(distributions.exp() * distributions).sum(-1), (1, 0)) * logps.mask
    else:
        logps = lean_logps(hidden, model, sequences, with_entropy, temperature)
    if with_hidden:
        logps.hidden = hidden
    if with_router_loss:
        logps.router_loss = out.aux_loss  # the model's own, over the rows' real tokens (their attention mask)
    return logps


def model_hidden(model: torch.nn.Module, sequences: Sequences, with_router_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last hidden states [B, T, H] of `sequences` under a causal LM (its output head's input, `output_head` turns them into logits)
    from one forward through `model` itself (a DDP wrapper synchronises), its head run on one position only; and with
    `with_router_loss` a Mixture of Experts' load-balancing loss (else None)."""
    routed = {"output_router_logits": True} if with_router_loss else {}
    out, hidden = forward_with_head_input(model, _inside_ddp(model).get_output_embeddings(), shrink=True, input_ids=sequences.input_ids,
                                          attention_mask=sequences.attention_mask, **routed)
    assert hidden is not None
    return hidden, out.aux_loss if with_router_loss else None


def forward_with_head_input(model: torch.nn.Module, head: torch.nn.Module | None, shrink: bool, **inputs: Any) -> tuple[Any, torch.Tensor | None]:
    """`model(**inputs)` and the input of `head` (the last hidden states [B, T, H]; None without a head).

    With `shrink` the head is handed a single position, so the model's own [B, T, V] logits
    shrink to [B, 1, V] (computed, then dropped): the caller runs the head where it needs it.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        captured["hidden"] = args[0]
        return (args[0][:, -1:],) + tuple(args[1:]) if shrink else None

    hook = head.register_forward_pre_hook(keep_input) if head is not None else None
    try:
        out = model(**inputs)
    finally:
        if hook is not None:
            hook.remove()
    return out, captured.get("hidden")


def packed_logps(model: torch.nn.Module, sequences: Sequences, with_entropy: bool = False, with_router_loss: bool = False,
                 temperature: float = 1.0) -> Logps | None:
    """`model_logps`' lean path through one packed forward; None where packing saves no row or may be wrong."""
    bare = _inside_ddp(model)  # the probe runs on the model inside DDP: it must not synchronise anything
    balancing = balancing_loss(bare) if with_router_loss else None
    layout = None if with_router_loss and balancing is None else packed_layout(bare, sequences.input_ids, sequences.attention_mask)
    if layout is None:
        return None
    # no attention mask: transformers then reads the sequence starts from position_ids
    routed = {"output_router_logits": True} if with_router_loss else {}
    out, hidden = forward_with_head_input(model, bare.get_output_embeddings(), shrink=True, input_ids=layout.input_ids,
                                          position_ids=layout.position_ids, use_cache=False, **routed)
    logps = lean_logps(layout.unpack(hidden), model, sequences, with_entropy, temperature)
    if balancing is not None:  # the packed rows' padding routes too: the loss is taken over the real tokens, as unpacked
        real = torch.zeros(layout.input_ids.numel(), dtype=torch.long, device=layout.input_ids.device)
        logps.router_loss = balancing(out.router_logits, attention_mask=real.index_fill(0, layout.source, 1).view_as(layout.input_ids))
    return logps


def balancing_loss(model: torch.nn.Module) -> Callable[..., torch.Tensor] | None:
    """A Mixture-of-Experts causal LM's `load_balancing_loss_func(router_logits, attention_mask=...)`, with its own numbers of
    experts, as its forward calls it; None where the model's module has none (a dense model, remote code)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's
    experts, top_k = getattr(lm, "num_experts", None), getattr(lm, "num_experts_per_tok", None)
    for cls in type(lm).__mro__:  # FSDP2 makes a subclass of the model's own class
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if function is not None and isinstance(experts, int) and isinstance(top_k, int):
            return partial(function, num_experts=experts, top_k=top_k)
    return None


def router_loss_coef(model: torch.nn.Module, given: float | None) -> float:
    """The weight of a Mixture-of-Experts model's load-balancing loss in each training loss, as TRL's trainers add it: `given`
    (`--router-aux-loss-coef`), else the model config's own `router_aux_loss_coef`; 0 for a dense model, which refuses a weight."""
    config = config_of(model)
    if not hasattr(config, "output_router_logits") or balancing_loss(model) is None:
        if given:
            raise PrefError(f"--router-aux-loss-coef {given}: {type(model).__name__} is not a Mixture-of-Experts model with a "
                            "load-balancing loss; drop --router-aux-loss-coef")
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if given is None else given


def head_output_scale(config: Any) -> float:
    """What a model multiplies its LM head's output by, before any soft-capping: Cohere's `logit_scale`, Falcon-H1's
    `lm_head_multiplier`, Muse Glimmer's `output_multiplier`, HyperCLOVA X's `logits_scaling`, the Granite models'
    1 / `logits_scaling`; 1 for the others (MiniCPM3 scales the head's input instead, which the lean path is handed)."""
    for key in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    scaling, kind = getattr(config, "logits_scaling", None), str(getattr(config, "model_type", ""))
    if isinstance(scaling, (int, float)) and kind.startswith(("granite", "hyperclovax")):
        return float(scaling) if kind.startswith("hyperclovax") else 1 / float(scaling)
    return 1.0


@dataclass
class OutputHead:
    """A causal LM's output layer: `logits(hidden)` turns last hidden states [N, H] (`Logps.hidden` rows) into the float32
    next-token logits [N, V] its forward would give, with the output scaling (`head_output_scale`) and final soft-capping
    (Gemma 2) some architectures apply. `module` is the head itself; `weight`/`bias` replace it where it is sharded (FSDP2's
    shards, gathered whole once by `output_head`)."""

    module: torch.nn.Module
    scale: float = 1.0
    softcap: float | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            logits = self.module(hidden).float()
        else:
            logits = torch.nn.functional.linear(hidden, self.weight.to(hidden.dtype), self.bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_head(model: torch.nn.Module) -> OutputHead:
    """`model`'s `OutputHead` (inside DDP-like wrappers). A head FSDP2 left sharded (a frozen reference's, resharded after each
    forward) is gathered now, once: every process calls this together."""
    from torch.distributed.tensor import DTensor

    bare = _inside_ddp(model)
    head, config = bare.get_output_embeddings(), config_of(bare)
    found = OutputHead(head, head_output_scale(config), getattr(config, "final_logit_softcapping", None))
    if isinstance(head.weight, DTensor):
        found.weight = head.weight.full_tensor()
        found.bias = head.bias.full_tensor() if isinstance(head.bias, DTensor) else head.bias
    return found


def lean_logps(hidden: torch.Tensor, model: torch.nn.Module, sequences: Sequences, with_entropy: bool = False,
               temperature: float = 1.0) -> Logps:
    """Log-probs of the completion tokens from the last hidden states, without the full logits.

    hidden: [B, T, H], where `model`'s LM head on `hidden[:, t]` predicts token t + 1 (after
    the scaling (`head_output_scale`) and final soft-capping (Gemma 2) some architectures apply).
    Only the N completion positions go through the head, in chunks of
    `LOGIT_CHUNK_ELEMENTS // V` rows; with grad enabled each chunk is recomputed in
    the backward pass instead of being kept, so a step holds one chunk's logits
    [rows, V] at a time instead of [B, T, V]. Returns the same `Logps` as
    `logps_from_logits` (logits=None), with each token's entropy from the same chunks if `with_entropy`.
    """
    head = output_head(model)
    mask = sequences.completion_mask.clone()
    mask[:, 0] = 0
    where = mask.bool()  # [B, T]: token t is predicted at position t - 1
    rows = hidden[:, :-1][where[:, 1:]]  # [N, H]
    targets = sequences.input_ids[where]  # [N]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.module.weight.shape[0])

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head.logits(h) if temperature == 1.0 else head.logits(h) / temperature
        normaliser = torch.logsumexp(logits, dim=-1)
        picked = torch.gather(logits, 1, t.unsqueeze(-1)).squeeze(-1) - normaliser
        if not with_entropy:
            return picked
        log_p = logits - normaliser.unsqueeze(-1)  # -sum p log p from log p itself: log Z - sum p * logit cancels large numbers
        return torch.stack([picked, -(log_p.exp() * log_p).sum(-1)])

    grad = torch.is_grad_enabled()
    parts = []
    for start in range(0, rows.shape[0], chunk):
        h, t = rows[start : start + chunk], targets[start : start + chunk]
        parts.append(checkpoint(chunk_logps, h, t, use_reentrant=False) if grad else chunk_logps(h, t))
    picked = torch.cat(parts, dim=-1) if parts else rows.new_zeros((2, 0) if with_entropy else (0,), dtype=torch.float32)
    entropy = None
    if with_entropy:  # each chunk gave its log-probs and entropies stacked
        picked, entropy = picked[0], torch.zeros(where.shape, device=picked.device).masked_scatter(where, picked[1])
    token_logps = torch.zeros(where.shape, dtype=picked.dtype, device=picked.device).masked_scatter(where, picked)
    if not parts and grad:
        # no completion token at all (each masked out): zeros still joined to the graph, so that backward (and DDP's) runs
        token_logps = token_logps + 0 * chunk_logps(hidden[:1, 0], sequences.input_ids[:1, 0]).sum()
    return Logps(token_logps, mask, token_logps.sum(-1), entropy=entropy)
