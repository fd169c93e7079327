"""Online batches: sample K completions per prompt, score them, select pairs or sets (or keep them all)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pref.data import RolloutSteps, ShuffledBatches
from pref.errors import NoUsablePairs, PrefError
from pref.examples import Prompt, columns_of, prompt_of
from pref.reporting.diversity import distinct_ratio, entropy_bits
from pref.interfaces import (
    SAMPLES, SETS, CandidatePool, LabeledBatch, ObjectiveNeeds, PairBatch, PairSelector, Policy, Processes, RewardSource, Samples,
    SamplingConfig, ScoredBatch, Selection,
)
from pref.sequences import Sequences

log = logging.getLogger(__name__)


class OnlineBatches:
    """Each `next()` samples from the current policy and returns a training batch and its metrics.

    All P x K samples of a step come from one batched `policy.sample` call; rewards and selectors
    read their text, batches hold the token ids as sampled (`Samples`). For objectives that
    learn from SAMPLES nothing is selected: all P x K samples and their scores form a
    `ScoredBatch` rollout, served as the objective's epochs x mini-batches `Minibatch` steps
    (see `RolloutSteps`). Other objectives get a `PairBatch` (PAIRS) or a `LabeledBatch` (SETS)
    of what the selector picked; the other rows are dropped, and when no prompt of a draw gives
    a usable pair, the next prompts are drawn (up to `MAX_DRAWS` times).

    `order`: any object with next()/state()/load_state()/metrics() may replace the shuffled
    prompts (a curriculum over records). `after_draw` is called after each draw, and with SAMPLES
    after each step's mini-batch (a second model trained as soon as a selection asks for it), and returns metrics.
    `sampling_together`: sampling is a collective (a sharded model gathers its weights for it), so every
    process draws in every round of draws, one that already has its batch too (its extra draw is dropped).
    Drawing together, a `PrefError` of one process's draw (its reward's, its selector's) is raised on every process
    before the next collective, where the others would wait for it.
    """

    MAX_DRAWS = 10

    def __init__(self, policy: Policy, records: Sequence[Any], reward: RewardSource | None, selector: PairSelector | None, needs: ObjectiveNeeds,
                 samples_per_prompt: int, sampling: SamplingConfig, prompts_per_step: int, seed: int, rank: int = 0, world: int = 1,
                 order: Any = None, after_draw: Callable[[], dict[str, float]] | None = None, processes: Processes | None = None,
                 sampling_together: bool = False):
        self.policy = policy
        self.reward = reward
        self.selector = selector
        self.data = needs.data
        self.k = samples_per_prompt
        self.sampling = sampling
        self.after_draw = after_draw
        self.together = sampling_together or after_draw is not None  # every process goes through each round of draws
        self.sampling_together = sampling_together
        self.unscored_samples, self.warned = needs.unscored_samples, False
        self.columns = needs.columns  # the row columns the objective's loss reads
        self.on_policy_fraction, self.answers, self.seed = needs.on_policy_fraction, needs.off_policy_answers, seed
        self.processes = processes or Processes()
        self.order = order if order is not None else ShuffledBatches(list(records), prompts_per_step, seed, rank, world)
        self.steps = None
        if needs.data == SAMPLES:
            self.steps = RolloutSteps(self._rollout, self.order, needs.epochs_per_rollout, needs.minibatches_per_rollout, seed)

    def next(self) -> tuple[Any, dict[str, float]]:
        if self.steps is not None:
            batch, metrics = self.steps.next()
            return batch, {**metrics, **self.after_draw()} if self.after_draw is not None else metrics
        batch, metrics = None, {}
        for draw in range(self.MAX_DRAWS):
            failed = None
            try:
                if batch is None:
                    batch, metrics = self._draw()
                    metrics["samples/redraws"] = float(draw)
                elif self.sampling_together:
                    self._draw()  # its part in the others' sampling; this process keeps the batch it has
            except PrefError as exc:  # a reward's or selector's error on this process: every process raises it, before the next collective
                if not self.together:
                    raise
                failed = exc
            if self.together and self.processes.mean(torch.tensor([float(failed is not None)])).item() > 0:
                raise PrefError(next(str(e) for e in self.processes.gather([failed and str(failed)]) if e)) from None
            if self.after_draw is not None:  # every process asks once per round of draws, as the hook may average across them
                metrics.update(self.after_draw())
            if self.together and self.processes.mean(torch.tensor([float(batch is not None)])).item() < 1:
                continue  # some process draws again
            if batch is not None:
                return batch, metrics
        raise NoUsablePairs(
            f"no usable pair in {self.MAX_DRAWS} draws of prompts: every pool was all-equal or unusable; "
            "raise --samples-per-prompt or --temperature, or check the reward"
        )

    def _sample(self) -> tuple[list[Prompt], Samples, dict[str, torch.Tensor], dict[str, list[Any]], dict[str, float]]:
        """The order's next prompts, K samples each from one `policy.sample` call, their flat [P * K] scores and the row columns
        the reward and the objective read."""
        records = self.order.next()
        prompts = [prompt_of(record) for record in records]  # a record (with a `prompt`) gives its prompt
        start = time.perf_counter()
        on_policy = self._on_policy()
        samples = self.policy.sample(prompts, self.k, self.sampling) if on_policy else self._rows_answers(records, prompts)
        sampled = time.perf_counter()
        flat_completions = [completion for row in samples.completions for completion in row]
        metrics = {"samples/distinct_ratio": distinct_ratio(flat_completions), "samples/entropy": entropy_bits(flat_completions),
                   "time/sampling": sampled - start}
        if self.on_policy_fraction < 1.0:
            metrics["samples/on_policy"] = float(on_policy)
        flat_records = flatten(records, samples.completions)[0]
        own = {name: [columns_of(record)[name] for record in flat_records] for name in self.columns}
        if self.reward is None:  # an objective that needs no score (distill), given no reward to log
            return prompts, samples, {}, own, {**metrics, "time/scoring": 0.0}
        scores, columns, figures = scored(self.reward, records, samples.completions, samples.sequences, kept=tuple(own))
        columns = {**own, **columns}
        unscored = scores["reward"].isnan()
        if unscored.any() and not self.unscored_samples:
            require_scored(scores["reward"], flat_completions, "this objective")
        if unscored.any() and not self.warned and self.processes.rank == 0:
            self.warned = True
            log.warning(f"the reward left {int(unscored.sum())} of {len(unscored)} samples unscored (the first: "
                        f"{flat_completions[int(unscored.nonzero()[0])][:60]!r}); they get no advantage, and reward/* leaves them out")
        rewards = scores["reward"][~unscored]
        metrics.update({
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "reward/max": rewards.max().item() if rewards.numel() else math.nan,
            "time/scoring": time.perf_counter() - sampled,
            **figures,
        })
        return prompts, samples, scores, columns, metrics

    def _on_policy(self) -> bool:
        """Whether this rollout is sampled from the policy (`needs.on_policy_fraction`, GKD's lmbda): a draw seeded by the run's seed
        and the rollout's number, so every process takes the same decision, and a resumed run the one it took."""
        if self.on_policy_fraction >= 1.0:
            return True
        assert self.steps is not None  # below 1 only with SAMPLES (ObjectiveNeeds)
        generator = torch.Generator().manual_seed(self.seed * 7_919 + self.steps.rollouts)
        return torch.rand((), generator=generator).item() < self.on_policy_fraction

    def _rows_answers(self, records: list[Any], prompts: list[Prompt]) -> Samples:
        """The rows' own answers (their `needs.off_policy_answers` column: a text, or chat messages whose last one is the answer) in
        place of samples, K copies of each, encoded as the policy encodes a prompt and an answer."""
        answers = [answer_text(columns_of(record)[self.answers], self.answers) for record in records]
        flat_prompts, flat_answers = flatten(prompts, [[answer] * self.k for answer in answers])
        return Samples([[answer] * self.k for answer in answers], self.policy.encode(flat_prompts, flat_answers),
                       torch.zeros(len(flat_answers), dtype=torch.bool))

    def _draw(self) -> tuple[PairBatch | LabeledBatch | None, dict[str, float]]:
        """Sample, score, and let the selector pick pairs or sets."""
        prompts, samples, flat_scores, columns, metrics = self._sample()
        start = time.perf_counter()
        scores = {name: values.reshape(len(prompts), self.k) for name, values in flat_scores.items()}
        logps = None
        assert self.selector is not None
        if self.selector.needs_logps:
            with torch.no_grad():
                logps = self.policy.logps(samples.sequences).sequence.reshape(len(prompts), self.k).cpu()
        selection = self.selector.select(CandidatePool(list(prompts), samples.completions, scores, logps))
        check_selection(self.selector, selection, self.data, len(prompts), self.k)
        metrics["time/scoring"] += time.perf_counter() - start
        metrics.update({
            "pairs/usable_fraction": len({p for p, _, _ in selection.pairs} | {p for p, _ in selection.accepted + selection.rejected}) / len(prompts),
            **selection.metrics,
            **self.order.metrics(),
        })
        batch = self._batch(samples.sequences, selection)
        if batch is not None:  # what the rows were selected from, for --log-completions
            batch.drawn = ScoredBatch(*flatten(prompts, samples.completions), samples.sequences, flat_scores, self.k, columns=columns)
        return batch, metrics

    def _rollout(self) -> tuple[ScoredBatch, dict[str, float]]:
        """SAMPLES: all P x K samples of the next prompts, scored, none selected."""
        prompts, samples, scores, columns, metrics = self._sample()
        flat_prompts, flat_completions = flatten(prompts, samples.completions)
        batch = ScoredBatch(flat_prompts, flat_completions, samples.sequences, scores, self.k, self.sampling.max_new_tokens, samples.truncated,
                            dict(self.reward.weights) if self.reward is not None else {}, columns, self.sampling.temperature)
        return batch, {**metrics, **self.order.metrics()}

    def _batch(self, sequences: Sequences, selection: Selection) -> PairBatch | LabeledBatch | None:
        """The selected rows of the [P * K] sampled `sequences`; None when the selector picked none."""
        if self.data == SETS:
            sets = selection.accepted + selection.rejected
            labels = torch.tensor([True] * len(selection.accepted) + [False] * len(selection.rejected))
            return LabeledBatch(rows_of(sequences, [p * self.k + k for p, k in sets]), labels) if sets else None
        chosen, rejected = [p * self.k + c for p, c, _ in selection.pairs], [p * self.k + r for p, _, r in selection.pairs]
        return PairBatch(rows_of(sequences, chosen), rows_of(sequences, rejected)) if selection.pairs else None

    def state(self) -> dict[str, int]:
        return (self.steps or self.order).state()

    def load_state(self, state: dict[str, int]) -> None:
        (self.steps or self.order).load_state(state)


def sample_pool(policy: Policy, records: list[Any], reward: RewardSource, k: int, sampling: SamplingConfig, batch_size: int,
                processes: Processes, sampling_together: bool = False, what: str = "samples of each prompt") -> CandidatePool:
    """`k` samples of the prompt of every one of `records` from the policy as it is, scored (an objective's starting samples,
    an evaluation's): every prompt and every score on every process, and the texts of this process's share only ([] for the
    others' prompts: every process holding every text would take a GB or so at 100k prompts x 8).

    Each process samples its share (every `world`-th prompt), `batch_size` prompts at a time, with a progress bar saying
    `what`; `sampling_together`: sampling is a collective (a sharded model), so every process samples as many times.
    """
    from pref.reference import precompute_progress

    prompts = [prompt_of(record) for record in records]
    mine = list(range(processes.rank, len(prompts), processes.world))
    rounds = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    if sampling_together:  # a process with a shorter share samples the first prompt again, and drops it
        rounds += [[]] * (math.ceil(math.ceil(len(prompts) / processes.world) / batch_size) - len(rounds))
    rows: list[tuple[int, dict[str, list[float]]]] = []
    texts: dict[int, list[str]] = {}
    with precompute_progress(len(mine), what) as advance:
        for indices in rounds:
            samples = policy.sample([prompts[i] for i in indices or [0]], k, sampling)
            if not indices:
                continue
            scores, _, _ = scored(reward, [records[i] for i in indices], samples.completions, samples.sequences)
            for j, i in enumerate(indices):
                texts[i] = samples.completions[j]
                rows.append((i, {name: values[j * k : (j + 1) * k].tolist() for name, values in scores.items()}))
            advance(len(indices))
    rows = sorted(processes.gather(rows), key=lambda row: row[0])
    return CandidatePool(list(prompts), [texts.get(i, []) for i in range(len(prompts))],
                         {name: torch.tensor([scores[name] for _, scores in rows]) for name in rows[0][1]})


def scored(reward: RewardSource, records: list[Any], completions: list[list[str]], sequences: Sequences,
           kept: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, list[Any]], dict[str, float]]:
    """The reward's checked scores of K completions of each record's prompt, flat [P * K], the record columns it read and the
    columns it logged, flat too, and the figures it logged (as `reward/NAME`); a reward that `reads_completion_ids` gets those of
    `sequences` (the [P * K] rows sampled) too. `kept`: other row columns each sample's row holds (the objective's)."""
    flat_records, flat_completions = flatten(records, completions)
    columns = {name: [columns_of(record)[name] for record in flat_records] for name in reward.columns}
    ids = {"completion_ids": completion_ids(sequences)} if reward.reads_completion_ids else {}
    scores = reward.score([prompt_of(record) for record in flat_records], flat_completions, **columns, **ids)
    checked = checked_scores(reward, scores, len(flat_completions))
    figures, logged_columns = checked_logs(reward, reward.logged(), len(flat_completions), {*SAMPLE_FIELDS, *kept, *columns, *checked})
    return checked, {**columns, **logged_columns}, figures


#: The figures pref logs of every reward, which a reward's own `logged` figures may not replace.
REWARD_FIGURES = ("mean", "std", "max")
#: What each sample's `--log-completions` row holds besides the reward's columns and scores.
SAMPLE_FIELDS = ("step", "prompt", "completion")


def checked_logs(reward: RewardSource, logs: Any, rows: int, taken: set[str]) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """A reward's `logged()`: its figures named `reward/NAME`, and its columns, none of which may replace what a sample's row
    already holds (`taken`: its step, prompt, completion, the row columns read, the scores); a mistake is a `PrefError` naming it."""
    name = type(reward).__name__
    figures, columns = logs
    for key, value in figures.items():
        if key in REWARD_FIGURES:
            raise PrefError(f"the reward {name} logged a figure named {key!r}, which pref logs itself as reward/{key}: give it another name")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrefError(f"the reward {name} logged {key!r} as {value!r}; a logged figure is one number")
    for key, values in columns.items():
        if key in taken:
            raise PrefError(f"the reward {name} logged a column named {key!r}, which each sample's logged row already holds "
                            f"({', '.join(sorted(taken))}): give it another name")
        if len(values) != rows:
            raise PrefError(f"the reward {name} logged the column {key!r} with {len(values)} values; it needs one per completion "
                            f"of the call that logged it ({rows})")
    return {f"reward/{key}": float(value) for key, value in figures.items()}, dict(columns)


def completion_ids(sequences: Sequences) -> list[list[int]]:
    """Each row's completion token ids: as sampled, with the end token the policy emitted (none where the length limit cut it)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(sequences.input_ids.cpu(), sequences.completion_mask.cpu())]


def require_scored(rewards: torch.Tensor, completions: list[str], learner: str) -> None:
    """A `PrefError` when the reward left one of `completions` unscored (NaN, a reward function's None): `learner` needs them all."""
    unscored = rewards.isnan().flatten().nonzero()
    if len(unscored):
        raise PrefError(f"the reward left {len(unscored)} of {rewards.numel()} samples unscored (a reward function's None, or NaN; the first: "
                        f"{completions[int(unscored[0])][:60]!r}), and {learner} learns from every sample's reward: return a number "
                        "for each completion (grpo and rloo give unscored samples no advantage)")


def require_columns(columns: tuple[str, ...], reader: str, records: list[Any], dataset: str | None, hint: str = "") -> None:
    """A `PrefError` when one of `records` (read from `--dataset` entry `dataset`; None: there is none) lacks one of the `columns`
    that `reader` ("the reward NAME", as the user named it, or an objective's name) reads; `hint` ends its message."""
    wanted = ", ".join(map(repr, columns))
    if dataset is None:
        raise PrefError(f"{reader} reads the column {wanted} of each prompt's row: pass --dataset with such rows{hint}")
    for number, record in enumerate(records, start=1):
        missing = [column for column in columns if column not in columns_of(record)]
        if missing:
            raise PrefError(f"{reader} reads the column {wanted} of each prompt's row, but record {number} of --dataset {dataset} "
                            f"has no {', '.join(map(repr, missing))}; give rows of a prompt and {wanted}{hint}")


def answer_text(value: Any, column: str, where: str = "a row") -> str:
    """A row's own answer in its `column` (`ObjectiveNeeds.off_policy_answers`): a text, or chat messages whose last one is it."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise PrefError(f"the column {column!r} of {where} holds {type(value).__name__} {str(value)[:40]!r}, not an answer's text (or "
                        "chat messages ending in it)")
    return value


def require_answers(column: str, records: list[Any], dataset: str) -> None:
    """A `PrefError` naming the first of `records` (read from `--dataset` entry `dataset`) whose `column` holds no answer."""
    for number, record in enumerate(records, start=1):
        answer_text(columns_of(record)[column], column, f"record {number} of --dataset {dataset}")


def flatten(prompts: list[Prompt], completions: list[list[str]]) -> tuple[list[Prompt], list[str]]:
    """P prompts with K completions each -> the [P * K] rows, prompt by prompt: (prompts, completions)."""
    return [p for p, row in zip(prompts, completions) for _ in row], [c for row in completions for c in row]


def rows_of(sequences: Sequences, rows: list[int]) -> Sequences:
    """Those rows of `sequences`, without the padding columns none of them needs."""
    picked = sequences.select(rows)
    width = int(picked.attention_mask.sum(-1).max())
    return Sequences(*(t[:, :width] for t in vars(picked).values()))


def checked_scores(reward: RewardSource, scores: Any, rows: int) -> dict[str, torch.Tensor]:
    """The reward's scores, on the CPU as floats; a plugin's mistake (no `reward`, not a tensor [rows]) is a `PrefError` naming it."""
    name = type(reward).__name__
    if not isinstance(scores, dict) or "reward" not in scores:
        given = ", ".join(scores) if isinstance(scores, dict) else f"a {type(scores).__name__}"
        raise PrefError(f"reward {name} gave no score named 'reward' (it gave {given or 'none'}); its score() must return a dict with 'reward'")
    for key, values in scores.items():
        if not isinstance(values, torch.Tensor) or values.shape != (rows,):
            what = f"a tensor of shape {list(values.shape)}" if isinstance(values, torch.Tensor) else f"a {type(values).__name__}"
            raise PrefError(f"reward {name}'s score {key!r} is {what}; score() must give a float tensor [{rows}], one value per answer")
    return {key: values.detach().float().cpu() for key, values in scores.items()}  # on the CPU whatever device they were computed on


def check_selection(selector: PairSelector, selection: Selection, data: str, prompts: int, k: int) -> None:
    """A plugin's mistake in a `Selection` (the other kind than the objective learns from, a row outside the pool) is a `PrefError`."""
    name = type(selector).__name__
    sets = selection.accepted + selection.rejected
    wanted, given = ("sets", selection.pairs) if data == SETS else ("pairs", sets)
    if given and not (sets if data == SETS else selection.pairs):
        raise PrefError(f"pair selector {name} picked {'pairs' if data == SETS else 'accepted and rejected sets'}, but the objective learns "
                        f"from {wanted}: choose a selector that picks {wanted} (`pref list-plugins --kind pair-selector`)")
    for entry in [*selection.pairs, *sets]:
        if not (0 <= entry[0] < prompts and all(0 <= sample < k for sample in entry[1:])):
            raise PrefError(f"pair selector {name} picked {tuple(entry)}, outside its pool of {prompts} prompts x {k} samples")
