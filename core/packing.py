"""Padding-free forwards: several right-padded rows packed back to back into fewer rows.

A packed row holds whole sequences one after another, each with `position_ids` starting
again at 0. Called with those `position_ids` and no attention mask, transformers
(`masking_utils.find_packed_sequence_indices`) gives sdpa, eager and flex attention a
block-diagonal causal mask, and flash attention its variable-length path, so no sequence
sees another. Not every model honours this (remote code, older architectures): a model
is probed once (`packs_correctly`) before any of its forwards is packed.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: Attention implementations whose transformers masking honours packed position_ids.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
#: Largest per-token log-prob difference between a packed and a padded probe forward
#: accepted as rounding: float32, and half precision (weights or autocast).
PROBE_TOLERANCE = {torch.float32: 1e-3, "half": 5e-2}
#: Sequence lengths of the probe: packed into width 12 as [12], [7, 5] and [4 + padding].
PROBE_LENGTHS = (7, 5, 12, 4)

_verdicts: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def packing_plan(lengths: list[int], width: int) -> list[list[int]]:
    """Which rows share a packed row: first-fit decreasing by length, ties by row order.

    lengths: real tokens per row (rows of length 0 are left out); width: tokens per packed row,
    at least the longest length. Returns the packed rows, each a list of row indices in the
    order they sit in it.
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


@dataclass
class Packed:
    """B right-padded rows of width T packed into R rows of width W.

    input_ids:    [R, W] the sequences back to back, then padding (token 0)
    position_ids: [R, W] 0, 1, ... from each sequence start (and from the padding's start)
    source:       [N] flat index into the [R * W] packed positions of each real token...
    target:       [N] ...and its flat index into the [B * T] padded positions
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    rows: int  # B
    width: int  # T

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[R, W, ...] values at packed positions -> [B, T, ...], zeros at padding (differentiable)."""
        flat = packed.reshape(-1, *packed.shape[2:])
        out = flat.new_zeros(self.rows * self.width, *packed.shape[2:])
        return out.index_copy(0, self.target, flat[self.source]).reshape(self.rows, self.width, *packed.shape[2:])


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Real tokens per row when every row is its real tokens followed by padding, else None."""
    lengths = attention_mask.sum(-1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        return None
    return lengths.tolist()


def pack(input_ids: torch.Tensor, lengths: list[int], plan: list[list[int]]) -> Packed:
    """Lay the rows of `input_ids` [B, T] out as `plan` says, in rows as wide as the longest length."""
    rows, width = input_ids.shape
    packed_width = max(lengths)
    positions, source, target = [], [], []
    for r, members in enumerate(plan):
        offset = 0
        for i in members:
            positions.append(torch.arange(lengths[i]))
            source.append(torch.arange(lengths[i]) + r * packed_width + offset)
            target.append(torch.arange(lengths[i]) + i * width)
            offset += lengths[i]
        positions.append(torch.arange(packed_width - offset))  # the padding restarts too: it is a block of its own
    source_index = torch.cat(source).to(input_ids.device)
    target_index = torch.cat(target).to(input_ids.device)
    packed_ids = input_ids.new_zeros(len(plan) * packed_width)
    packed_ids[source_index] = input_ids.reshape(-1)[target_index]
    position_ids = torch.cat(positions).reshape(len(plan), packed_width).to(input_ids.device)
    return Packed(packed_ids.reshape(len(plan), packed_width), position_ids, source_index, target_index, rows, width)


def config_of(model: torch.nn.Module):
    """The (text) config of a model or its PEFT wrapper; None if it has none."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def may_pack(model: torch.nn.Module) -> bool:
    """What a model's settings say, before any probe: False where packing cannot be right."""
    config = config_of(model)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in PACKED_ATTENTION:
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False  # virtual tokens in front of every row: peft drops position_ids
    return True


def packed_layout(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed | None:
    """Right-padded rows `input_ids` [B, T] packed for `model`; None where that saves no row or may be wrong.

    `model` is the bare model or its PEFT wrapper, as for `packs_correctly`, whose probe runs
    before the rows are looked at. Rows are not packed when attention is limited to a window
    (sliding or chunked) shorter than the longest row.
    """
    if not may_pack(model) or not packs_correctly(model):
        return None
    lengths = right_padded_lengths(attention_mask)
    if lengths is None or max(lengths) == 0:
        return None
    config = config_of(model)
    layers = getattr(config, "layer_types", None)  # where a config names each layer's attention, a window it leaves unused is none
    windowed = not isinstance(layers, (list, tuple)) or any(kind in ("sliding_attention", "chunked_attention") for kind in layers)
    for key in ("sliding_window", "attention_chunk_size"):
        window = getattr(config, key, None)
        if windowed and isinstance(window, int) and window < max(lengths):
            return None
    plan = packing_plan(lengths, max(lengths))
    return pack(input_ids, lengths, plan) if len(plan) < len(lengths) else None


def packs_correctly(model: torch.nn.Module) -> bool:
    """Whether packed forwards of `model` give its padded forwards' log-probs; probed once per model.

    `model` is the bare model or its PEFT wrapper (not DDP: the probe must not synchronise
    anything). The probe is the same on every process, whatever its data, so processes
    that share collectives (FSDP) all run it at the same call.
    """
    verdict = _verdicts.get(model)
    if verdict is None:
        try:
            verdict = _probe(model)
        except Exception as exc:  # a model that cannot even take position_ids this way
            log.info("packed forwards are off for %s: its probe failed (%s)", type(model).__name__, exc)
            verdict = False
        _verdicts[model] = verdict
    return verdict


@torch.no_grad()
def _probe(model: torch.nn.Module) -> bool:
    """Packed against padded log-probs of a few fixed rows, and against a plain causal forward of the packed rows.

    A model that honours packing gives its padded values up to rounding; one that ignores the
    restarting positions or the block mask lands near (or on) the plain causal forward's values.
    Requiring the packed error to be both within `PROBE_TOLERANCE` and under a quarter of the
    plain forward's error keeps a model out even when, with random weights, context barely matters.
    """
    lengths, width = list(PROBE_LENGTHS), max(PROBE_LENGTHS)
    # fixed, spread-out token ids: no random numbers drawn, so a run's random stream is untouched
    ids = ((torch.arange(len(lengths) * width) * 7919 + 13) % config_of(model).vocab_size).reshape(len(lengths), width)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    parameter = next(model.parameters())
    ids, mask = (ids * mask).to(parameter.device), mask.to(parameter.device)
    packed = pack(ids, lengths, packing_plan(lengths, width))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no dropout: the forwards must be comparable
    try:
        padded_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        packed_logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits.float()
        plain_logits = model(input_ids=packed.input_ids, use_cache=False).logits.float()
    finally:
        for module, training in modes:
            module.training = training

    def token_logps(logits: torch.Tensor) -> torch.Tensor:
        return torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]

    padded = token_logps(padded_logits)
    error = (token_logps(packed.unpack(packed_logits)) - padded).abs().max().item()
    plain_error = (token_logps(packed.unpack(plain_logits)) - padded).abs().max().item()
    half = parameter.dtype != torch.float32 or torch.is_autocast_enabled(parameter.device.type)
    tolerance = PROBE_TOLERANCE["half" if half else torch.float32]
    if not (error <= tolerance and error <= plain_error / 4):
        log.info("packed forwards are off for %s: packed log-probs differ from padded ones by %.3g (tolerance %.0e; "
                 "a plain causal forward of the packed rows: by %.3g)", type(model).__name__, error, tolerance, plain_error)
        return False
    return True
