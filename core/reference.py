"""References: a frozen model, the model with its adapter off, log-probs cached on disk, or none."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from pref.errors import PrefError
from pref.interfaces import Adapter, Processes, Reference
from pref.sequences import Logps, OutputHead, Sequences, model_hidden, model_logps, output_head
from pref.sharding import shard


def cache_dir() -> str:
    """pref's cache folder: $PREF_CACHE, else $XDG_CACHE_HOME/pref or ~/.cache/pref."""
    return os.environ.get("PREF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pref")


class FrozenReference(Reference):
    """A frozen copy of a model, kept in memory and evaluated without grad; `packing` as `model_logps`'.

    Under `--fsdp` the copy is sharded like the policy (`shard`): each process holds 1/N of its weights,
    and each `logps` call is a collective that every process makes together.
    """

    has_logits = True

    def __init__(self, model: torch.nn.Module, packing: bool = False):
        self.model = model
        self.packing = packing
        self.sharded = False  # the model is its own, sharded by `shard`

    @classmethod
    def copy_of(cls, model: torch.nn.Module, packing: bool = False) -> "FrozenReference":
        return cls(copy.deepcopy(model).eval().requires_grad_(False), packing)

    def shard(self, dtype: torch.dtype) -> None:
        """Shard the frozen copy over the processes as the policy is (FSDP2, `pref.sharding.shard`): a collective."""
        shard(self.model, dtype)
        self.sharded = True

    @torch.no_grad()
    def logps(self, sequences: Sequences, with_logits: bool = False, temperature: float = 1.0) -> Logps:
        return self._forward(lambda: model_logps(self.model, sequences.to(self.device), with_logits=with_logits, packing=self.packing,
                                                 temperature=temperature))

    @torch.no_grad()
    def hidden_states(self, sequences: Sequences) -> torch.Tensor:
        return self._forward(lambda: model_hidden(self.model, sequences.to(self.device))[0])

    def output_head(self) -> OutputHead:
        """The frozen model's output layer; sharded, it is gathered whole (a collective: every process calls it together)."""
        return output_head(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, compute: Any) -> Any:
        """`compute()` in eval mode (no dropout in the reference's numbers); a sharded copy resharded after it."""
        was_training = self.model.training
        self.model.eval()
        result = compute()
        self.model.train(was_training)
        if self.sharded:  # FSDP2 keeps a root's own weights (embeddings, LM head) gathered after a forward, for a backward that never comes
            self.model.reshard()
        return result


class AdaptersOffReference(Reference):
    """The reference of a run with an adapter: the policy's own model with its adapter switched off.

    No second copy of the weights: `model` is the policy's, wrapped by `adapter`.
    """

    has_logits = True

    def __init__(self, model: torch.nn.Module, adapter: Adapter, packing: bool = False):
        self.model, self.adapter, self.frozen = model, adapter, FrozenReference(model, packing)

    def logps(self, sequences: Sequences, with_logits: bool = False, temperature: float = 1.0) -> Logps:
        with self.adapter.disabled(self.model):
            return self.frozen.logps(sequences, with_logits, temperature)

    def hidden_states(self, sequences: Sequences) -> torch.Tensor:
        with self.adapter.disabled(self.model):
            return self.frozen.hidden_states(sequences)

    def output_head(self) -> OutputHead:
        """The base model's output layer: an adapter on it (LoRA's `base_layer`) left out."""
        head = output_head(self.model)
        head.module = getattr(head.module, "base_layer", head.module)
        return head


def model_fingerprint(model: torch.nn.Module, name: str) -> str:
    """Identifies a model's weights: its name, config and a hash of all parameters."""
    digest = hashlib.sha1(name.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:: max(1, tensor.numel() // 4096)])
    return digest.hexdigest()[:16]


@contextmanager
def precompute_progress(rows: int, what: str = "reference log-probs (once, then cached)") -> Iterator[Any]:
    """A bar on stderr, on the main process, while `what` of `rows` rows is computed; yields `advance(n)`. Where stderr is no
    terminal (a job's log file), one plain line says what is computed instead."""
    from accelerate import PartialState
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console, main = Console(stderr=True), PartialState().is_main_process
    if main and not console.is_terminal:
        console.print(f"{what}: {rows} rows", highlight=False)
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not main or not console.is_terminal)
    task = bar.add_task("reference", total=rows)
    with bar:
        yield lambda n: bar.advance(task, n)


def rows_by_length(batches: list[Sequences], rows_per_batch: int) -> Iterator[tuple[list[str], Sequences]]:
    """The distinct rows of `batches`, cut at their last real token and regrouped shortest first.

    Yields (row keys, `Sequences`) batches of up to `rows_per_batch` rows. Rows of similar
    length share a batch, so little of a forward pass goes to padding, and a row that
    appears twice is scored once.
    """
    rows: dict[str, Sequences] = {}
    for batch in batches:
        ends = (batch.attention_mask.cumsum(-1).argmax(-1) + 1).tolist()  # one past the last real token
        for i, key in enumerate(batch.keys()):
            if key not in rows:
                rows[key] = Sequences(*(t[i : i + 1, : ends[i]] for t in vars(batch).values()))
    ordered = sorted(rows, key=lambda k: rows[k].input_ids.shape[1])
    for start in range(0, len(ordered), rows_per_batch):
        keys = ordered[start : start + rows_per_batch]
        yield keys, Sequences.concat([rows[k] for k in keys])


def write_table(table: dict[str, float], path: str) -> None:
    """The cached log-probs `table` (row key -> summed log-prob) as PATH (float64 safetensors) and PATH.keys.json, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ordered = sorted(table)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({"logps": torch.tensor([table[k] for k in ordered], dtype=torch.float64)}, tmp)
    with open(tmp + ".keys.json", "w") as f:
        json.dump(ordered, f)
    os.replace(tmp + ".keys.json", path + ".keys.json")
    os.replace(tmp, path)


class CachedReference(Reference):
    """Sequence log-probs computed once by a reference model and stored on disk.

    Rows are looked up by the hash of their tokens, so the cache does not
    depend on batch order. The reference model is not needed afterwards.
    """

    def __init__(self, table: dict[str, float]):
        self.table = table

    @classmethod
    def build(cls, model: torch.nn.Module, model_name: str, batches: Iterable[Sequences], cache_dir: str,
              packing: bool = False, processes: Processes | None = None) -> "CachedReference":
        """Load the cache for (model, data) from `cache_dir`, or compute and write it (`packing`: as `model_logps`).

        Every one of `processes` makes this call with the same `batches`: they share the work (each computes
        every world-th forward) and all get the whole table; process 0 writes it.
        """
        processes = processes or Processes()
        batches = list(batches)
        keys = sorted({k for b in batches for k in b.keys()})
        data_fp = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"reference-{model_fingerprint(model, model_name)}-{data_fp}.safetensors")
        if all(processes.gather([os.path.exists(path)])):  # all load it, or all compute it together (a process may see it written first)
            with open(path + ".keys.json") as f:
                return cls(dict(zip(json.load(f), load_file(path)["logps"].tolist())))
        frozen = FrozenReference(model, packing)
        table: dict[str, float] = {}
        # as many rows per forward as a training step's chosen + rejected batch: no more memory than training
        rows_per_batch = 2 * max((len(b) for b in batches), default=1)
        starts = range(processes.rank * rows_per_batch, len(keys), processes.world * rows_per_batch)  # this process's forwards
        with precompute_progress(sum(min(rows_per_batch, len(keys) - start) for start in starts)) as advance:  # minutes at real sizes
            for index, (rows, batch) in enumerate(rows_by_length(batches, rows_per_batch)):
                if index % processes.world == processes.rank:
                    table.update(zip(rows, frozen.logps(batch).sequence.tolist()))
                    advance(len(rows))
        if processes.world > 1:
            table = {key: value for part in processes.gather([table]) for key, value in part.items()}
        if processes.rank == 0:
            write_table(table, path)
        return cls(table)

    def logps(self, sequences: Sequences, with_logits: bool = False, temperature: float = 1.0) -> Logps:
        if with_logits or temperature != 1.0:
            raise PrefError(f"this objective needs the reference's {'full distributions' if with_logits else f'log-probs at temperature {temperature}'}, "
                            "not those cached: use --reference model")
        try:
            values = [self.table[k] for k in sequences.keys()]
        except KeyError:
            raise PrefError(
                "a row is missing from the reference log-probs cached for the dataset: the objective scored a row that is not "
                "in the dataset; declare ObjectiveNeeds(scores_new_rows=True) so a frozen reference is used, or run with --reference model"
            ) from None
        mask = sequences.completion_mask
        sequence = torch.tensor(values, dtype=torch.float32, device=mask.device)
        # only whole-sequence values are cached; per-token ones are not available
        return Logps(tokens=torch.zeros(mask.shape, device=mask.device), mask=mask, sequence=sequence)
