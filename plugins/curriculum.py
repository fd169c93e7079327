"""The `curriculum` sampler: which dataset each training record comes from, steered by difficulty.

A built-in plugin of the sampler kind (`register_samplers`, see docs/plugins.md);
`pref run --curriculum` is `--sampler curriculum`. `Curriculum` is an order, like
`ShuffledBatches`: `next()` gives this process's `batch_size` records, and
`state()`/`load_state()` continue a run exactly. Any objective can use it:
offline batches are built from its records, online ones sample from the
records' prompts.

Each dataset has a sampling weight, equal at the start. A frozen copy of the
policy, refreshed every `refresh` steps, scores a fresh sample of `sample_size`
records of each dataset every `every` steps: the mean of the per-token negative
log-likelihoods is the dataset's difficulty, their variance how mixed it is.
The weights then take one projected-gradient step towards the harder, more
varied datasets (`update_weights`). Weights, difficulties and variances are
logged as `curriculum/weight/NAME`, `curriculum/difficulty/NAME` and
`curriculum/variance/NAME`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pref.data import ShuffledBatches
from pref.errors import PrefError, unknown_name
from pref.hookspecs import hookimpl
from pref.policy import unwrap
from pref.plugins.evaluators import text_nll


@dataclass
class CurriculumOptions:
    """`--curriculum-option KEY=VALUE`: eta (step size), every and refresh (in optimizer steps),
    sample_size (records scored per dataset), variance_weight (lambda, the variance's share of the metric)."""

    eta: float = 0.1
    every: int = 10
    refresh: int = 50
    sample_size: int = 32
    variance_weight: float = 0.5

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "CurriculumOptions":
        """Check and convert user options; a wrong key or value is a one-line PrefError."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in options.items():
            if key not in fields:
                raise unknown_name("curriculum option", key, fields)
            kind = int if fields[key].type == "int" else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise PrefError(f"curriculum option {key} must be a {'whole ' if kind is int else ''}number, not {value!r}")
            values[key] = kind(value)
        result = cls(**values)
        for key in ("every", "refresh", "sample_size"):
            if getattr(result, key) < 1:
                raise PrefError(f"curriculum option {key} must be at least 1, not {getattr(result, key)}")
        if result.eta < 0 or result.variance_weight < 0:
            raise PrefError("curriculum options eta and variance_weight must not be negative")
        return result


def shares(values: torch.Tensor) -> torch.Tensor:
    """`values / values.sum()`, or equal shares when they sum to zero (no information)."""
    total = values.sum()
    return values / total if total > 0 else torch.full_like(values, 1.0 / len(values))


def update_weights(weights: torch.Tensor, difficulties: torch.Tensor, variances: torch.Tensor, eta: float, variance_weight: float) -> torch.Tensor:
    """One step of the sampling weights [n] towards harder, more varied datasets.

    Difficulties d and variances v [n] are first made shares, so the metric has no
    units (NLL and NLL squared) and neither term swamps the other:

        m_i = (d_i / sum(d) + lambda * v_i / sum(v)) / (1 + lambda)        (sum_i m_i = 1)

    The weights maximise the expected metric of the next batch, J(w) = sum_i w_i m_i.
    Its gradient dJ/dw_i = m_i, projected on the simplex (the changes sum to zero),
    is g_i = m_i - 1/n. One step of size eta, clipped at zero and renormalized:

        w_i <- max(0, w_i + eta * g_i);   w <- w / sum(w)

    A dataset whose metric is above average gains weight; at weight zero it is no
    longer sampled but still scored, so it can come back.
    """
    metric = (shares(difficulties) + variance_weight * shares(variances)) / (1 + variance_weight)
    gradient = metric - 1.0 / len(metric)
    stepped = (weights + eta * gradient).clamp(min=0)
    return stepped / stepped.sum()


class Curriculum:
    """Batches drawn from several datasets with weights steered by difficulty.

    Args:
        datasets: name -> records (TextExample, PreferenceExample, ... : anything `scored_text` reads).
        policy: the model being trained; a frozen copy of its model scores the samples.
        batch_size: records per process per `next()`.
        seed: seeds the dataset choices, each dataset's order and the scored samples.
        rank, world: this process and the number of processes; all draw the same global batch.
        options: eta, every, refresh, sample_size, variance_weight.
        batches_per_step: `next()` calls per optimizer step (gradient accumulation; below 1 when
            one batch serves several steps), so that `every` and `refresh` count optimizer steps.

    Processes compute the same estimates on the same samples, so their weights agree.
    After `load_state` the frozen copy is taken afresh from the (resumed) policy: a run
    resumed from a checkpoint that is not on a refresh step scores later samples with a
    slightly newer copy than an uninterrupted run would.
    """

    def __init__(
        self,
        datasets: dict[str, Sequence[Any]],
        policy: Any,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        options: CurriculumOptions | None = None,
        batches_per_step: float = 1,
    ):
        if len(datasets) < 2:
            raise PrefError("--curriculum needs two or more --dataset entries to choose between")
        for name, records in datasets.items():
            if not records:
                raise PrefError(f"curriculum dataset {name!r} has no records")
        self.names = list(datasets)
        self.datasets = [list(records) for records in datasets.values()]
        self.policy = policy
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.options = options or CurriculumOptions()
        self.batches_per_step = batches_per_step
        self.orders = [ShuffledBatches(records, 1, seed * 101 + i + 1) for i, records in enumerate(self.datasets)]
        n = len(self.datasets)
        self.weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self.difficulties = torch.zeros(n, dtype=torch.float64)
        self.variances = torch.zeros(n, dtype=torch.float64)
        self.draws = 0
        self.frozen = copy.deepcopy(unwrap(policy.model)).eval().requires_grad_(False)

    # -- drawing --------------------------------------------------------------------------------

    def next(self) -> list[Any]:
        """This process's next `batch_size` records, each from a dataset drawn by the weights."""
        self._update_if_due()
        global_size = self.batch_size * self.world
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        choices = torch.multinomial(self.weights, global_size, replacement=True, generator=generator).tolist()
        picked = []
        for slot, dataset in enumerate(choices):
            record = self.orders[dataset].next()[0]  # every process advances every order alike
            if slot // self.batch_size == self.rank:
                picked.append(record)
        self.draws += 1
        return picked

    def metrics(self) -> dict[str, float]:
        """Weight, difficulty and variance of each dataset, for the step's log."""
        out = {}
        for i, name in enumerate(self.names):
            out[f"curriculum/weight/{name}"] = self.weights[i].item()
            out[f"curriculum/difficulty/{name}"] = self.difficulties[i].item()
            out[f"curriculum/variance/{name}"] = self.variances[i].item()
        return out

    # -- steering -------------------------------------------------------------------------------

    def _update_if_due(self) -> None:
        refresh = max(1, round(self.options.refresh * self.batches_per_step))  # in batches drawn
        every = max(1, round(self.options.every * self.batches_per_step))
        if self.draws and self.draws % refresh == 0:
            self.refresh()
        if self.draws % every == 0:  # also at the start, so the first steps log a difficulty
            self.estimate()
            if self.draws:
                self.weights = update_weights(self.weights, self.difficulties, self.variances, self.options.eta, self.options.variance_weight)

    def refresh(self) -> None:
        """Copy the policy's current weights into the frozen copy."""
        self.frozen.load_state_dict(unwrap(self.policy.model).state_dict())

    def estimate(self) -> None:
        """Score a fresh seeded sample of each dataset with the frozen copy: mean and variance of the per-token NLL."""
        for i, records in enumerate(self.datasets):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) * 31 + i)
            picked = torch.randperm(len(records), generator=generator)[: self.options.sample_size].tolist()
            nll = text_nll(self.frozen, self.policy, [records[j] for j in picked], self.batch_size).double()
            self.difficulties[i] = nll.mean()
            self.variances[i] = nll.var() if len(nll) > 1 else 0.0

    # -- resuming -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "draws": self.draws,
            "weights": self.weights.tolist(),
            "difficulties": self.difficulties.tolist(),
            "variances": self.variances.tolist(),
            "orders": [order.state() for order in self.orders],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("names") != self.names:
            raise PrefError(f"the checkpoint's curriculum datasets {state.get('names')} differ from this run's {self.names}")
        self.draws = state["draws"]
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.difficulties = torch.tensor(state["difficulties"], dtype=torch.float64)
        self.variances = torch.tensor(state["variances"], dtype=torch.float64)
        for order, order_state in zip(self.orders, state["orders"]):
            order.load_state(order_state)
        self.refresh()


class CurriculumSampler:
    """Sample several datasets with weights steered towards the harder, more varied ones.

    Built before the model loads with the user's options (checked here, so a bad one
    fails in seconds); `build(...)` makes the `Curriculum` once the records are read.
    """

    def __init__(self, eta: float = CurriculumOptions.eta, every: int = CurriculumOptions.every,
                 refresh: int = CurriculumOptions.refresh, sample_size: int = CurriculumOptions.sample_size,
                 variance_weight: float = CurriculumOptions.variance_weight):
        self.options = CurriculumOptions.from_dict(
            {"eta": eta, "every": every, "refresh": refresh, "sample_size": sample_size, "variance_weight": variance_weight})

    def build(self, datasets: dict[str, Sequence[Any]], policy: Any, batch_size: int, seed: int, rank: int = 0, world: int = 1,
              batches_per_step: float = 1) -> Curriculum:
        return Curriculum(datasets, policy, batch_size, seed, rank, world, self.options, batches_per_step)


@hookimpl
def register_samplers(register):
    register("curriculum", CurriculumSampler)
