"""The five interfaces every algorithm in pref is built from.

The training loop only talks to these; plugins implement them. Shapes use
B for rows, T for tokens, V for the vocabulary, P for prompts and K for
samples per prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, ClassVar, Union

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.sequences import Logps, OutputHead, Sequences


@dataclass
class SamplingConfig:
    """How completions are sampled from a policy."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # keep tokens at least this share of the likeliest one's probability (0: off)


@dataclass
class Samples:
    """K sampled completions for each of P prompts.

    completions: P lists of K texts, what rewards and selectors read.
    sequences:   [P * K] rows, prompt by prompt: the prompt's ids, then the completion's ids as
                 sampled, up to and including the EOS (or other end token) the policy emitted (none when it stopped
                 at `max_new_tokens`). Training on these, not on the re-encoded text, scores the very tokens sampled.
    truncated:   [P * K] bool, True where `max_new_tokens` cut the completion (no end token); None when unknown.
    """

    completions: list[list[str]]
    sequences: Sequences
    truncated: torch.Tensor | None = None


class Policy(ABC):
    """The model being trained.

    It samples completions, turns prompt/completion text into `Sequences`,
    and scores them: log-probabilities of completion tokens only, the prompt
    and the padding are masked out.
    """

    model: torch.nn.Module
    tokenizer: Any

    @abstractmethod
    def generate(self, prompts: list[Prompt], k: int, sampling: SamplingConfig) -> list[list[str]]:
        """Sample `k` completions for each prompt: a list of P lists of K strings."""

    def sample(self, prompts: list[Prompt], k: int, sampling: SamplingConfig) -> Samples:
        """`k` completions for each prompt, as text and as the token rows to train on (what online objectives use).

        By default the `generate`d texts, encoded; a policy that knows the ids it sampled returns them (`HFPolicy` does).
        """
        completions = self.generate(prompts, k, sampling)
        return Samples(completions, self.encode([p for p, row in zip(prompts, completions) for _ in row], [c for row in completions for c in row]))

    @abstractmethod
    def encode(self, prompts: list[Prompt], completions: list[str], max_prompt_length: int | None = None) -> Sequences:
        """Tokenize B prompt/completion pairs into right-padded `Sequences`, each prompt cut to its last `max_prompt_length` tokens
        (None: the run's `--max-prompt-length`)."""

    def encode_conversations(self, conversations: list[list[dict]]) -> Sequences:
        """Tokenize B whole conversations into right-padded `Sequences` whose completion mask covers every assistant answer."""
        raise PrefError(f"{type(self).__name__} cannot encode whole conversations (SFT's turns=all)")

    @abstractmethod
    def logps(self, sequences: Sequences, with_logits: bool = False, with_hidden: bool = False, with_entropy: bool = False,
              temperature: float = 1.0) -> Logps:
        """Per-token and per-sequence log-probs of the completion tokens (with grad).

        `with_logits` keeps the [B, T, V] logits, `with_hidden` the last hidden states [B, T, H],
        `with_entropy` each completion token's next-token entropy [B, T] (with grad, as the log-probs).
        Log-probs and entropies are those of softmax(logits / `temperature`), the distribution samples drawn at
        that temperature came from (`ScoredBatch.temperature`), as TRL's GRPO and RLOO trainers score them.
        """

    def hidden_states(self, sequences: Sequences) -> torch.Tensor:
        """The last hidden states [B, T, H] of the rows (with grad), whose `output_head()` gives the next-token logits at each position:
        an objective that matches whole distributions (distill) computes them a few rows at a time, never all [B, T, V] at once."""
        raise PrefError(f"{type(self).__name__} does not give its hidden states (an objective that matches whole distributions needs them)")

    def output_head(self) -> OutputHead:
        """The model's output layer, which turns `hidden_states` rows into next-token logits (with grad)."""
        raise PrefError(f"{type(self).__name__} does not give its output layer (an objective that matches whole distributions needs it)")

    @abstractmethod
    def save(self, path: str) -> None:
        """Write weights and tokenizer in Hugging Face format to `path`."""


class Reference(ABC):
    """What the policy is kept close to: a frozen model (the starting policy, or `--reference-model`), cached log-probs, or nothing."""

    #: True when `logps(..., with_logits=True)` can return full distributions (and `hidden_states` and `output_head` work).
    has_logits: ClassVar[bool] = False

    @abstractmethod
    def logps(self, sequences: Sequences, with_logits: bool = False, temperature: float = 1.0) -> Logps:
        """Reference log-probs for the same rows the policy scored (no grad), at `temperature` as `Policy.logps`."""

    def hidden_states(self, sequences: Sequences) -> torch.Tensor:
        """As `Policy.hidden_states`, without grad; a reference without a model has none."""
        raise PrefError("this objective needs the reference's full distributions: use --reference model")

    def output_head(self) -> OutputHead:
        """As `Policy.output_head`, the reference model's (its weights frozen)."""
        raise PrefError("this objective needs the reference's full distributions: use --reference model")


class RewardSource(ABC):
    """Scores completions. May return several named scores; `reward` is the main one."""

    #: Prompts used for online training when the user gives no dataset.
    default_prompts: ClassVar[list[str]] = []
    #: The score a sample needs to count as good, for rewards with a natural pass
    #: mark (a 0/1 check); selectors use it when the user sets no threshold.
    quality_threshold: ClassVar[float | None] = None
    #: New tokens enough for the answers this reward judges, for online sampling when
    #: the run sets no `max_new_tokens` (None: the run's default, 32).
    max_new_tokens: ClassVar[int | None] = None
    #: A reward that sums others (`weighted`): each part's name and weight, its scores holding each part's own as
    #: `NAME/reward` (for GRPO's normalize_then_sum); empty for a single reward.
    weights: dict[str, float] = {}
    #: Fields of each prompt's row that `score` reads besides the prompt (a reference answer, tests): each comes as a keyword
    #: argument, a list of one value per completion (`score(prompts, completions, answer=[...])`, as TRL's reward functions get
    #: dataset columns). Training records without them (`PromptExample.columns`) are refused before the model loads.
    columns: tuple[str, ...] = ()
    #: `score` also gets `completion_ids`: each completion's token ids, as sampled with the end token the policy emitted (as TRL's
    #: reward functions may take them; `pref eval`'s answers are tokenized again for it).
    reads_completion_ids: bool = False

    @abstractmethod
    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """Return a dict of name -> float tensor [B]; it must contain `reward`. A reward with `columns` takes them too.

        NaN marks a completion left unscored (a reward function's None): `weighted` sums the other parts' scores;
        a sample no part scored is left out by objectives with `needs.unscored_samples`, and refused by the others."""

    def at_step(self, step: int, steps: int) -> None:
        """Told by the loop before each training step draws its samples: `step` of the run's `steps` optimizer steps are done (TRL's
        `trainer_state`), for a reward that shapes its scores by training progress. The default ignores it."""

    def logged(self) -> tuple[dict[str, float], dict[str, list[Any]]]:
        """What the reward logged while scoring since it was last asked, and forgets: figures (name -> value, joined to the step's
        metrics as `reward/NAME`) and columns (name -> one value per completion of its last `score` call, written with each sample by
        `--log-completions`), as TRL's reward functions' `log_metric` and `log_extra`. The host asks after each `score` it makes
        while training; the default logs nothing."""
        return {}, {}

    def report(self, prompts: list[Prompt], completions: list[str], **columns: list[Any]) -> dict[str, float]:
        """Evaluation figures over a set of samples (`pref eval`): mean scores and diversity; `columns` as for `score`.

        Rewards may extend it with figures of their own.
        """
        from pref.reporting.diversity import distinct_ratio, entropy_bits

        scores = self.score(prompts, completions, **columns)
        figures: dict[str, float] = {"samples": float(len(completions))}
        figures.update({f"{name}/mean": values.float().nanmean().item() for name, values in scores.items()})  # of the scored ones
        figures.update({f"reward/{name}": float(value) for name, value in self.logged()[0].items() if f"reward/{name}" not in figures})
        figures["distinct_ratio"] = distinct_ratio(completions)
        figures["entropy_bits"] = entropy_bits(completions)
        return figures


class Embedder(ABC):
    """Semantic similarity between short texts (words, answers)."""

    @abstractmethod
    def similarity(self, texts: list[str]) -> torch.Tensor:
        """Pairwise similarity [N, N], 1.0 for identical meaning, near 0 for unrelated."""


class MetricsLogger(ABC):
    """Receives each logged step's metrics (JSONL, TensorBoard, a tracker, ...), and every step's for a live display.

    Built with `output_dir` (the run folder), and with `config` (the run's settings as
    run.json holds them, a resume's changes included, a dict) when its factory takes a
    `config` argument. The loop calls `start`, then for each step `log` (when the step is
    logged) and `show`, then `stop`, then, when the run ended well, `finish` and `close`.
    """

    def start(self, total_steps: int, start_step: int) -> None:
        """The loop is about to run steps `start_step + 1` to `total_steps` (a resumed run starts above 0); by default nothing."""

    @abstractmethod
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of a logged step (every `log_every` steps, each evaluated one, and the last; an early stop's evaluation may repeat it)."""

    def show(self, step: int, metrics: dict[str, float]) -> None:
        """Every step's metrics, logged or not, after `log` (a progress display); by default nothing."""

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """With `--log-completions`, after `log`: the samples a logged step drew, every process's, one row per sample
        (`prompt`, `completion`, the row columns the reward read, each score of the reward); by default nothing."""

    def stop(self) -> None:
        """The loop is over, whether the run ended well or failed; by default nothing."""

    def finish(self, final_dir: str) -> None:
        """Told where the final model was written, once, before `close`; by default nothing."""

    def close(self) -> None:
        """Flush and release files at the end of the run."""


@dataclass
class CandidatePool:
    """K scored samples for each of P prompts, as the pair selector sees them.

    `scores` maps a score name to a [P, K] tensor. `logps` holds the policy's
    sequence log-probs [P, K] when the objective asked for them.
    """

    prompts: list[Prompt]
    completions: list[list[str]]
    scores: dict[str, torch.Tensor]
    logps: torch.Tensor | None = None


@dataclass
class Selection:
    """What a `PairSelector` makes of a pool.

    `pairs` are (prompt index, chosen k, rejected k); `accepted`/`rejected`
    are (prompt index, k) for objectives that learn from unpaired sets.
    `metrics` counts edge cases (no valid sample, all equal, ...).
    """

    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    accepted: list[tuple[int, int]] = field(default_factory=list)
    rejected: list[tuple[int, int]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class PairSelector(ABC):
    """Turns K scored candidates per prompt into chosen/rejected pairs or sets.

    `needs_logps`: the pool must carry the policy's sequence log-probs [P, K] (set it
    in `__init__` when an option decides).
    """

    needs_logps: bool = False

    @abstractmethod
    def select(self, pool: CandidatePool) -> Selection:
        """Pick pairs or sets from the pool."""


Batch = Union["PairBatch", "LabeledBatch", "Minibatch", Any]


@dataclass
class PairBatch:
    """Chosen and rejected rows, aligned: row i of each comes from the same prompt (and of `gold`, when the examples have one).
    Online, `drawn` holds every sample the pairs were selected from, for `--log-completions`."""

    chosen: Sequences
    rejected: Sequences
    gold: Sequences | None = None
    drawn: ScoredBatch | None = None

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class LabeledBatch:
    """Unpaired rows with a label each: True for accepted, False for rejected; online, `drawn` as `PairBatch`'s."""

    sequences: Sequences
    labels: torch.Tensor  # [B] bool
    drawn: ScoredBatch | None = None


@dataclass
class ScoredBatch:
    """Every sample of an online step with its reward scores (objectives whose `needs.data` is SAMPLES).

    Row i is `completions[i]`, sampled for `prompts[i]`: the K samples of each prompt are
    consecutive rows (K = `samples_per_prompt`; group-relative objectives need it, since
    one prompt may be drawn several times). `scores` maps each score name of the reward
    to a float tensor [B]. `max_new_tokens`: the sampling limit the completions were drawn
    under (None when unknown), a constant a length normaliser may divide by (Dr. GRPO's).
    `truncated`: [B] bool, the completions that limit cut (`Samples.truncated`), or None when unknown.
    `reward_weights`: the parts of a reward that sums others and their weights (`RewardSource.weights`).
    `columns`: the row columns the reward read (`RewardSource.columns`) and those the objective reads (`ObjectiveNeeds.columns`),
    a list of B values each. `temperature`: the one the completions were drawn at (`--temperature`), at which an objective
    scores them when its loss is a policy gradient (`Policy.logps`).
    """

    prompts: list[Prompt]
    completions: list[str]
    sequences: Sequences
    scores: dict[str, torch.Tensor]
    samples_per_prompt: int = 1
    max_new_tokens: int | None = None
    truncated: torch.Tensor | None = None
    reward_weights: dict[str, float] = field(default_factory=dict)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    temperature: float = 1.0

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: torch.Tensor | list[int]) -> "ScoredBatch":
        rows = torch.as_tensor(rows, dtype=torch.long)
        picked = rows.tolist()
        return ScoredBatch(
            [self.prompts[i] for i in picked],
            [self.completions[i] for i in picked],
            self.sequences.select(rows),
            {name: values[rows.to(values.device)] for name, values in self.scores.items()},
            self.samples_per_prompt,
            self.max_new_tokens,
            None if self.truncated is None else self.truncated[rows.to(self.truncated.device)],
            self.reward_weights,
            {name: [values[i] for i in picked] for name, values in self.columns.items()},
            self.temperature,
        )


class Rollout:
    """One fresh batch that is trained on for several optimizer steps (see `Minibatch`).

    The objective's `prepare` runs on it at most once, on the first step that asks.
    """

    def __init__(self, batch: Any):
        self.batch = batch
        self._prepared: Any = None

    def prepared(self, objective: "Objective", policy: Policy, reference: Reference | None) -> Any:
        """`objective.prepare(policy, reference, batch)`, computed without grad the first time, then kept."""
        if self._prepared is None:
            with torch.no_grad():
                self._prepared = objective.prepare(policy, reference, self.batch)
        return self._prepared


@dataclass
class Minibatch:
    """One optimizer step's share of a rollout (objectives whose `needs.data` is SAMPLES).

    The data source serves each rollout as `needs.epochs_per_rollout` passes, each cut into
    `needs.minibatches_per_rollout` mini-batches of shuffled rows; every mini-batch is one step.

    rollout: the whole fresh batch, shared by all its mini-batches.
    rows:    [b] long, the rows of the rollout this step trains on.
    epoch, index: which pass over the rollout, and which mini-batch of that pass.
    """

    rollout: Rollout
    rows: torch.Tensor
    epoch: int = 0
    index: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def prepared(self, objective: "Objective", policy: Policy, reference: Reference | None) -> Any:
        """This step's rows of the prepared rollout: `objective.prepare(...)` (run once per rollout), then `.select(rows)`."""
        return self.rollout.prepared(objective, policy, reference).select(self.rows)


#: What an objective learns from (`ObjectiveNeeds.data`).
PAIRS, SETS, SAMPLES = "pairs", "sets", "samples"
#: What it needs of a reference (`ObjectiveNeeds.reference`): nothing, sequence
#: log-probs (a frozen model or a cache of them), or full next-token distributions
#: (a frozen model only).
NO_REFERENCE, REFERENCE_LOGPS, REFERENCE_DISTRIBUTIONS = "none", "logps", "distributions"


#: The built-in objectives' options that move a reference (`ObjectiveNeeds.moves_reference`), for errors.
MOVING_OPTIONS = "sync_ref_model, bema_reference, teacher_model_kind=ema"


@dataclass(frozen=True)
class ObjectiveNeeds:
    """Everything an objective asks of the run, read by the host in one place (`pref.plan`); docs/plugins.md has the table."""

    reference: str = REFERENCE_LOGPS  # NO_REFERENCE, REFERENCE_LOGPS (a frozen model or a cache) or REFERENCE_DISTRIBUTIONS (a frozen model)
    reference_optional: bool = False  # `--reference none` runs it without the reference it would use (DPO's loss then counts its log-probs as 0)
    data: str = PAIRS  # PAIRS (`PairBatch`), SETS (`LabeledBatch`), SAMPLES (online: `Minibatch`es of a `ScoredBatch` rollout, no selector)
    online: bool = False  # samples from the current policy at every step instead of reading a dataset
    samples_per_prompt: int = 1  # K when online (`--samples-per-prompt` overrides it)
    grouped: bool = False  # online: the loss compares each prompt's K samples with each other (GRPO's advantages), so K >= 2
    scored: bool = True  # online: the loss reads each sample's reward; False (distill): it needs none, and a --reward is only logged
    starting_samples: int = 0  # online: before training, this many samples of each training prompt from the starting policy, for `Objective.start`
    scores_new_rows: bool = False  # scores rows outside the dataset (own samples, rewritten rows): no cached reference, a frozen one
    unscored_samples: bool = False  # with SAMPLES: a sample the reward left unscored (NaN) gets no advantage, as in TRL's GRPO; else refused
    epochs_per_rollout: int = 1  # with SAMPLES: passes over each rollout...
    minibatches_per_rollout: int = 1  # ...and mini-batches per pass, each one optimizer step (PPO's)
    columns: tuple[str, ...] = ()  # with SAMPLES: the row columns `loss` reads (SDFT's demonstration), each sample's in `ScoredBatch.columns`
    on_policy_fraction: float = 1.0  # with SAMPLES: the share of rollouts sampled from the policy (GKD's lmbda); the others are...
    off_policy_answers: str | None = None  # ...the rows' own answers, this column of theirs (one of `columns`), K copies each
    own_reference_tokenizer: bool = False  # with REFERENCE_DISTRIBUTIONS: `--reference-model` may have another tokenizer (GOLD's teacher)
    dataset_builder: str = "preferences"  # the builder that reads a `--dataset PATH`
    reward: str | None = None  # the reward of an online run that names none
    own_reward: bool = False  # the objective brings its reward itself (`Objective.own_reward()`, D2PO's discriminator)
    trainable_modules: bool = False  # it trains modules along with the policy (`Objective.trainable_modules()`, a value head)
    second_model: bool = False  # it trains a second model on data of its own (`Objective.second_model()`, D2PO's discriminator)
    model_kind: str = "causal-lm"  # the trained model: "causal-lm" or "sequence-classifier"
    moves_reference: bool = False  # `after_step` changes the frozen reference's weights (TR-DPO): checkpoints keep them
    dropout: bool = False  # trains with the model's and the adapter's dropout; off as in TRL's DPO, KTO, CPO, ORPO, reward trainers

    def __post_init__(self) -> None:
        # a plugin author's mistake, caught when the objective is built: a one-line error, not a traceback
        if self.reference not in (NO_REFERENCE, REFERENCE_LOGPS, REFERENCE_DISTRIBUTIONS):
            raise PrefError(f"ObjectiveNeeds.reference must be none, logps or distributions, not {self.reference!r}")
        if self.data not in (PAIRS, SETS, SAMPLES):
            raise PrefError(f"ObjectiveNeeds.data must be pairs, sets or samples, not {self.data!r}")
        if self.data == SAMPLES and not self.online:
            raise PrefError("ObjectiveNeeds: data 'samples' is online only: set online=True")
        if min(self.samples_per_prompt, self.epochs_per_rollout, self.minibatches_per_rollout) < 1:
            raise PrefError("ObjectiveNeeds: samples per prompt, epochs and mini-batches per rollout must be at least 1")
        if not self.scored and (self.data != SAMPLES or self.starting_samples or self.own_reward or self.unscored_samples):
            raise PrefError("ObjectiveNeeds: scored=False (samples trained on without a reward) is for data 'samples' without starting "
                            "samples, an own reward or unscored_samples")
        if self.columns and self.data != SAMPLES:
            raise PrefError("ObjectiveNeeds: columns (row columns the loss reads) are for data 'samples'")
        if not 0.0 <= self.on_policy_fraction <= 1.0 or (self.on_policy_fraction < 1.0 and (self.data != SAMPLES or self.off_policy_answers
                                                                                                  not in self.columns)):
            raise PrefError("ObjectiveNeeds: on_policy_fraction lies in [0, 1]; below 1 it is for data 'samples', with off_policy_answers "
                            "naming one of its columns")
        if self.own_reference_tokenizer and self.reference != REFERENCE_DISTRIBUTIONS:
            raise PrefError("ObjectiveNeeds: own_reference_tokenizer (a reference with another tokenizer) is for reference 'distributions'")
        if self.starting_samples < 0 or (self.starting_samples and not self.online):
            raise PrefError("ObjectiveNeeds: starting_samples (samples of each training prompt before training) must be 0, or positive and online")

    @property
    def uses_selector(self) -> bool:
        """Online pairs or sets come from a pair selector; offline data and SAMPLES need none."""
        return self.online and self.data != SAMPLES


class Processes:
    """The training processes as the loop offers them to plugins: this one's `rank`, their
    number (`world`), and the reductions an objective may need. Plugins never call
    `torch.distributed` themselves. This base class is the single-process case."""

    rank: int = 0
    world: int = 1

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `values` (any shape, same on every process) across processes."""
        return values

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's `items` (picklable), concatenated in rank order."""
        return list(items)


class SecondModel(ABC):
    """A model an objective trains beside the policy, on data of its own (D2PO's discriminator).

    The loop owns its training: the AdamW optimizer (at `lr`), device placement, the run's
    autocast, averaging gradients across processes, the same starting weights on every
    process, and checkpointing. After each batch of policy data (before the policy's
    loss), the loop asks `batches()` for what to train on now; for each it takes one
    optimizer step on `loss(batch)`, then hands the steps' metrics to `trained`.
    """

    model: torch.nn.Module
    lr: float

    @abstractmethod
    def batches(self) -> Iterable[Any]:
        """The batches to train on now, in order (usually none); as many on every process."""

    @abstractmethod
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss on one batch (with grad), and float metrics."""

    def trained(self, steps: list[dict[str, float]]) -> dict[str, float]:
        """Figures to log once `batches()` is used up, given each step's metrics; by default none."""
        return {}


class Objective(ABC):
    """A loss over log-probs. It declares what it needs in `needs`; the loop provides it.

    Subclasses set `needs` (a class attribute, or in `__init__` when an option changes
    it) and implement `loss`.
    """

    needs: ObjectiveNeeds = ObjectiveNeeds()

    def setup(self, policy: Policy) -> None:
        """Called once the policy is loaded, before training: build heads, helper models, ..."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """With `needs.trainable_modules`: modules trained along with the policy (a value head, ...).

        The loop moves them to the device, optimizes them with the policy, averages
        their gradients across processes, and checkpoints them.
        """
        return {}

    def save(self, output_dir: str) -> None:
        """Write anything besides the policy that the run should keep (a discriminator, ...)."""

    def prepare(self, policy: Policy, reference: Reference | None, batch: Batch) -> Any:
        """With SAMPLES: turn a fresh rollout into what `loss` trains on, once, without grad.

        Called through `Minibatch.prepared` by the first step of each rollout, before any
        update on it: the place for old log-probs, values, rewards and advantages. The
        result must have `select(rows)`. By default the batch itself.
        """
        return batch

    def start(self, pool: CandidatePool) -> list[bool] | None:
        """With `needs.starting_samples` K: once before the first step of a run (a resume skips it), K samples of each training
        prompt from the starting policy, scored by the run's reward, every process's (the same prompts and scores on each; the
        texts of the process's own share, `pref.online.sample_pool`): the place
        for per-prompt estimates (A*-PO's optimal values), which `state_dict` then keeps. Returns which prompts to train
        on, one bool per prompt of the pool; None: all of them.
        """
        return None

    def second_model(self) -> SecondModel | None:
        """With `needs.second_model`: the second model it trains, once `setup` has run."""
        return None

    def own_reward(self) -> RewardSource | None:
        """With `needs.own_reward`: the reward the objective brings (D2PO's discriminator)."""
        return None

    def loss_items(self, batch: Batch) -> int | None:
        """For a `loss` that is a mean over items (SFT: its answer tokens), how many `batch` holds; None (the default) otherwise.

        With counts, the loop weighs each micro-batch's loss by its share of all the items of the optimizer
        step, over every micro-batch and process (TRL's `num_items_in_batch`): the update is that of one
        batch holding them all, however they were split. Without, each micro-batch's loss counts alike.
        """
        return None

    def after_step(self, step: int, policy: Policy, reference: Reference | None) -> None:
        """Called after each optimizer step (`step` counts from 1): the place to move a reference (TR-DPO)."""

    def reference_state(self, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
        """With `needs.moves_reference`: tensors besides the frozen `reference`'s weights that decide how it moves on (BEMA's
        averages), by name; checkpoints keep them with its weights, whole, and copy them back in place. By default none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State of its own that checkpoints keep (an adapted coefficient, ...); plain values only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @abstractmethod
    def loss(self, policy: Policy, reference: Reference | None, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss (with grad) and a dict of float metrics."""

    def default_selector(self, embedder: "Embedder | None" = None, reward: RewardSource | None = None) -> PairSelector | None:
        """The selector an online objective of PAIRS or SETS uses when the user names none."""
        return None


class Evaluator(ABC):
    """Measures the policy during training: every `--eval-every` steps and at the last step done, an early stop's too (`--evaluator NAME`).

    Every process calls `evaluate` at the same step, under the run's autocast, and must return
    the same figures on each (reduce with `processes.mean`). A figure named `validation/loss`
    decides the model the run keeps in `best/`: the one with the lowest so far.
    """

    @abstractmethod
    def evaluate(self, step: int, policy: Policy, reference: Reference | None, records: list[Any]) -> dict[str, float]:
        """Figures to log at `step`; `records` are the run's held-out records (--validation-split/-dataset), maybe none."""


class Adapter(ABC):
    """Trains a few added weights on a frozen model instead of every weight (`--adapter NAME`, `--lora`).

    `wrap` is the one method to write. The others suit every `peft` adapter (LoRA,
    IA3, LoHa, ...); an adapter that is not a peft model overrides them.
    """

    @abstractmethod
    def wrap(self, model: torch.nn.Module, kind: str) -> torch.nn.Module:
        """The model to train: `model` (`kind` "causal-lm" or "sequence-classifier") with the adapter
        added, where only the added weights (and a classifier's new score head) require grad.
        `policy.save` writes it with `save_pretrained`."""

    def disabled(self, model: torch.nn.Module) -> Any:
        """A context manager inside which the wrapped `model` computes as the base model: the run's reference."""
        return model.disable_adapter()

    def save_merged(self, model: torch.nn.Module, tokenizer: Any, path: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write full weights with the adapter folded in, which plain `transformers` loads, and the
        tokenizer into `path` (`--merge-lora`). The merge runs on a copy: `model` keeps its adapter.

        `weights`: where `model` is sharded (`--fsdp`), its state dict gathered whole; the copy is
        then built on the meta device and takes these tensors, so it costs no memory of its own."""
        import copy

        import peft

        if weights is None:
            model = copy.deepcopy(model)
        else:
            base = model.get_base_model()
            with torch.device("meta"):
                model = peft.get_peft_model(type(base)(base.config), model.peft_config[model.active_adapter])
            model.load_state_dict(weights, assign=True)
            model.get_base_model().tie_weights()
        model.merge_and_unload().save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
