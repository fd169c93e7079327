"""D2PO: discriminator-guided DPO with active relabeling (Singhal et al. 2024, arXiv 2405.01511).

Gold preference labels (a person, an expensive judge) are scarce. D2PO lets
a *discriminator*, a reward model, label the policy's samples, and spends
the gold labels on teaching the discriminator instead of on every pair:

1. the policy samples K (2) completions per prompt; the discriminator scores
   them; its higher-scored completion is chosen, the lower rejected, and the
   pairs train the policy with the DPO loss;
2. every `round_size` samples, `budget` of the round's pairs go to the gold
   reward: those the discriminator is least sure of (smallest |r1 - r2|), or
   random ones. Pairs of the current step take the gold preference; pairs the
   gold reward ties are dropped (the label is still spent);
3. the discriminator is then trained, with the Bradley-Terry loss, on all
   gold-labelled pairs so far (`disc_epochs` passes, its own AdamW).

In pref this is an online objective whose `own_reward()` is the discriminator
and whose `default_selector()` does steps 1-2 (`DiscriminatorRelabeler`); the
loop does step 3 when the discriminator, its `second_model()`, asks for it.
`budget=0` keeps the discriminator frozen (the static reward model baseline);
`--objective online-dpo --reward GOLD -k 2` spends a gold label on every pair.

The training loop trains the discriminator (`Discriminator` is a `SecondModel`): its
optimizer, device, mixed precision, gradient averaging and checkpoint are the loop's,
so D2PO runs in several processes; gold pairs labelled by any process train all.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import CandidatePool, Embedder, PairBatch, PairSelector, Policy, Processes, RewardSource, SecondModel, Selection
from pref.models import SCORE_HEAD, quiet_new_heads
from pref.plugins.dpo import DPO
from pref.plugins.reward_model import SequenceScorer, bradley_terry_loss, pair_scores
from pref.policy import HFPolicy, unwrap

SELECTIONS = ("confidence", "random")
DISCRIMINATOR_DIR = "discriminator"
GOLD_PAIRS_FILE = "gold_pairs.jsonl"


@dataclass
class Candidate:
    """A pair the discriminator ordered: `first` scored at least as high as `second`.

    `pool_pair` is (prompt index, first k, second k) in the current step's pool,
    or None once that step has passed.
    """

    prompt: Prompt
    first: str
    second: str
    first_score: float
    second_score: float
    pool_pair: tuple[int, int, int] | None = None

    @property
    def confidence(self) -> float:
        return abs(self.first_score - self.second_score)


@dataclass
class GoldPair:
    """A pair the gold reward preferred one side of."""

    prompt: Prompt
    chosen: str
    rejected: str


def pick_for_relabeling(candidates: list[Candidate], budget: int, selection: str) -> list[int]:
    """Indices of at most `budget` candidates: the least confident first, or a uniform random choice.

    Confidence ties keep the candidates' order; "random" draws from torch's global generator.
    """
    if selection not in SELECTIONS:
        raise PrefError(f"unknown D2PO selection {selection!r}: choose one of {', '.join(SELECTIONS)}")
    budget = min(budget, len(candidates))
    if selection == "confidence":
        return sorted(range(len(candidates)), key=lambda i: candidates[i].confidence)[:budget]
    return sorted(torch.randperm(len(candidates))[:budget].tolist())


class Discriminator(RewardSource, SecondModel):
    """D2PO's discriminator: a reward (a one-score sequence classifier) that the loop trains on gold pairs.

    Args:
        classifier: an `HFPolicy` whose model is an `AutoModelForSequenceClassification` (num_labels=1);
            None until `attach(classifier)` (D2PO builds it from the policy once that has loaded).
        lr: its AdamW learning rate.
        epochs: passes over all gold pairs at each update.
        batch_size: pairs per update step, and rows per scoring pass.
        default_prompts: the prompts to train on when there is no dataset (the gold reward's).
        processes: the run's processes: gold pairs labelled by any of them train every one.
        gold: the gold reward, told the training progress the loop tells the discriminator (`at_step`).

    As a `SecondModel`: once `learn` was told of a finished round (on any process), the
    next `batches()` are `epochs` shuffled passes over all gold pairs so far, each cut into
    `batch_size` pairs, for the Bradley-Terry loss; `trained` reports the mean loss of the
    last pass and the accuracy on the gold pairs afterwards.
    """

    def __init__(self, classifier: HFPolicy | None = None, lr: float = 1e-4, epochs: int = 4, batch_size: int = 16,
                 default_prompts: list[str] | None = None, processes: Processes | None = None, gold: RewardSource | None = None):
        self.lr = lr
        self.gold = gold
        self.epochs = epochs
        self.batch_size = batch_size
        self.default_prompts = list(default_prompts or [])
        self.processes = processes or Processes()
        self.gold_pairs: list[GoldPair] = []  # what it trains on: every process's gold pairs so far
        self.fresh: list[GoldPair] = []  # labelled here since the last update
        self.due = False  # a round ended here since the last update
        self.classifier: HFPolicy | None = None
        if classifier is not None:
            self.attach(classifier)

    def attach(self, classifier: HFPolicy) -> None:
        """Score and train with `classifier` from now on."""
        self.classifier = classifier
        self.scorer = SequenceScorer(classifier, self.batch_size)
        self.model = classifier.model

    def at_step(self, step: int, steps: int) -> None:
        if self.gold is not None:
            self.gold.at_step(step, steps)

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward`: the discriminator's score, float [B] (no grad)."""
        return {"reward": self.scorer.scores(prompts, completions)}

    def accuracy(self, pairs: list[GoldPair]) -> float:
        """Share of `pairs` whose chosen side it scores strictly higher."""
        if not pairs:
            return float("nan")
        prompts = [p.prompt for p in pairs]
        chosen = self.scorer.scores(prompts, [p.chosen for p in pairs])
        rejected = self.scorer.scores(prompts, [p.rejected for p in pairs])
        return (chosen > rejected).float().mean().item()

    def learn(self, fresh: list[GoldPair]) -> None:
        """A round ended with these new gold pairs: train on all gold pairs at the next `batches()`."""
        self.fresh.extend(fresh)
        self.due = True

    def batches(self) -> Iterator[PairBatch]:
        """`epochs` shuffled passes over every gold pair, when a round ended on any process; else none.

        A generator: each pass is shuffled (torch's global generator; every process uses
        the first process's order) only once the loop has trained on the pass before.
        """
        due = self.due
        if self.processes.world > 1:
            due = self.processes.mean(torch.tensor([float(due)])).item() > 0
        self.gold_pairs.extend(self.processes.gather(self.fresh))
        self.fresh, self.due = [], False
        if not due or not self.gold_pairs:
            return
        pairs = self.gold_pairs
        for _ in range(self.epochs):
            order = torch.randperm(len(pairs))
            if self.processes.world > 1:
                order = self.processes.gather([order])[0]
            order = order.tolist()
            for start in range(0, len(pairs), self.batch_size):
                rows = [pairs[i] for i in order[start : start + self.batch_size]]
                prompts = [r.prompt for r in rows]
                yield PairBatch(
                    chosen=self.classifier.encode(prompts, [r.chosen for r in rows]),
                    rejected=self.classifier.encode(prompts, [r.rejected for r in rows]),
                )

    def loss(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean Bradley-Terry loss of a batch of gold pairs."""
        chosen, rejected = pair_scores(self.model, batch, self.classifier.tokenizer.pad_token_id)
        loss = bradley_terry_loss(chosen, rejected).mean()
        return loss, {"loss": loss.item()}

    def trained(self, steps: list[dict[str, float]]) -> dict[str, float]:
        """The mean loss of the last pass, and the accuracy on all gold pairs after the update."""
        last_pass = steps[-math.ceil(len(self.gold_pairs) / self.batch_size) :]
        loss = sum(step["loss"] for step in last_pass) / len(last_pass)
        return {"discriminator/loss": loss, "discriminator/train_accuracy": self.accuracy(self.gold_pairs)}

    def save(self, path: str) -> None:
        self.classifier.save(path)


class DiscriminatorRelabeler(PairSelector):
    """D2PO's pair selector: pairs by discriminator score, gold relabeling and discriminator updates.

    For each prompt the sample the discriminator scores highest is chosen and
    the lowest rejected (identical answers give no pair; equal scores give a
    pair only if relabeled). Every `round_size` samples, `budget` of the round's
    pairs are relabeled by `gold` and the discriminator is trained on all gold
    pairs so far.

    Metrics of every step:
        gold/labels_spent: gold pair labels queried so far (ties included).
        gold/relabeled, gold/ties_dropped: this step's relabeled pairs, and those the gold reward tied.
        discriminator/confidence: mean |r1 - r2| of this step's pairs.
        eval/gold_reward: mean gold reward of this step's samples, with `eval_gold`.
        gold/reward/NAME: a figure the gold reward logged as it scored (a reward function's `log_metric`).
            Evaluation only: never used for training and not counted in labels spent.
    and, at the end of a round:
        discriminator/accuracy: agreement with the round's new gold pairs, measured
            before training on them (ties excluded).
        discriminator/loss, discriminator/train_accuracy: of the update, on all gold pairs.
        discriminator/gold_pairs: gold pairs it has been trained on.
    """

    def __init__(self, discriminator: Discriminator, gold: RewardSource, round_size: int = 64, budget: int = 8,
                 selection: str = "confidence", eval_gold: bool = True):
        self.discriminator = discriminator
        self.gold = gold
        self.round_size = round_size
        self.budget = budget
        self.selection = selection
        self.eval_gold = eval_gold
        self.gold_pairs: list[GoldPair] = []
        self.round: list[Candidate] = []
        self.samples_in_round = 0
        self.labels_spent = 0

    def select(self, pool: CandidatePool) -> Selection:
        scores = pool.scores["reward"]  # [P, K] discriminator scores
        metrics = {"pools/identical": 0.0, "gold/relabeled": 0.0, "gold/ties_dropped": 0.0}
        step: list[Candidate] = []
        for p, row in enumerate(scores):
            first, second = int(row.argmax()), int(row.argmin())
            answers = pool.completions[p]
            if first == second:  # all scores equal: any two different answers
                second = next((k for k, a in enumerate(answers) if a.strip() != answers[first].strip()), first)
            if answers[first].strip() == answers[second].strip():
                metrics["pools/identical"] += 1
                continue
            step.append(Candidate(pool.prompts[p], answers[first], answers[second], float(row[first]), float(row[second]), (p, first, second)))
        for candidate in self.round:
            candidate.pool_pair = None  # earlier steps' pairs were trained on already
        self.round.extend(step)
        self.samples_in_round += scores.numel()

        # the policy learns from the discriminator's order, unless the gold reward relabels a pair
        order: dict[tuple[int, int, int], tuple[int, int, int] | None] = {
            c.pool_pair: (c.pool_pair if c.first_score > c.second_score else None) for c in step if c.pool_pair
        }
        if self.budget > 0 and self.samples_in_round >= self.round_size:
            metrics.update(self._relabel(order, metrics))
        metrics["gold/labels_spent"] = float(self.labels_spent)
        metrics["discriminator/confidence"] = sum(c.confidence for c in step) / len(step) if step else 0.0
        if self.eval_gold:
            flat_prompts = [p for p, row in zip(pool.prompts, pool.completions) for _ in row]
            flat = [c for row in pool.completions for c in row]
            metrics["eval/gold_reward"] = self.gold.score(flat_prompts, flat)["reward"].float().mean().item()
        # what the gold reward logged as it labelled (its columns are of label queries, not of the pool's samples: dropped)
        metrics.update({f"gold/reward/{name}": value for name, value in self.gold.logged()[0].items()})
        return Selection(pairs=[pair for pair in order.values() if pair is not None], metrics=metrics)

    def _relabel(self, order: dict[tuple[int, int, int], Any], metrics: dict[str, float]) -> dict[str, float]:
        """Spend the budget on the round's pairs, learn from the gold labels, start a new round."""
        picked = [self.round[i] for i in pick_for_relabeling(self.round, self.budget, self.selection)]
        prompts = [c.prompt for c in picked] * 2
        gold = self.gold.score(prompts, [c.first for c in picked] + [c.second for c in picked])["reward"].float()
        first_gold, second_gold = gold[: len(picked)], gold[len(picked) :]
        fresh, agreed = [], 0
        for candidate, a, b in zip(picked, first_gold.tolist(), second_gold.tolist()):
            if a == b:
                metrics["gold/ties_dropped"] += 1
                if candidate.pool_pair:
                    order[candidate.pool_pair] = None
                continue
            first_wins = a > b
            agreed += first_wins and candidate.first_score > candidate.second_score
            chosen, rejected = (candidate.first, candidate.second) if first_wins else (candidate.second, candidate.first)
            fresh.append(GoldPair(candidate.prompt, chosen, rejected))
            if candidate.pool_pair:
                p, k1, k2 = candidate.pool_pair
                order[candidate.pool_pair] = (p, k1, k2) if first_wins else (p, k2, k1)
        metrics["gold/relabeled"] = float(len(picked))
        self.labels_spent += len(picked)
        self.round, self.samples_in_round = [], 0
        self.gold_pairs.extend(fresh)
        self.discriminator.learn(fresh)  # the loop trains it before the policy's next update
        return {"discriminator/accuracy": agreed / len(fresh) if fresh else float("nan"),
                "discriminator/gold_pairs": float(len(self.gold_pairs))}


class D2PO(DPO):
    """D2PO: DPO on pairs a discriminator labels, relabeling its least confident pairs with a gold reward.

    Options:
        gold: the gold reward plugin (default "bag-of-words"), and gold_options its options.
        discriminator: path or hub id of a reward model to start from; by default a
            copy of the policy's starting weights with a new one-score head.
        round_size: policy samples per round (default 64).
        budget: gold-labelled pairs per round (default 8); 0 keeps the discriminator frozen.
        selection: "confidence" (the least confident pairs, the default) or "random".
        disc_epochs, disc_lr, disc_batch_size: the discriminator's updates (4, 1e-4, 16).
        eval_gold: log the gold reward of every step's samples (evaluation only; default true).
        gold_pairs: a JSONL file of gold pairs (prompt, chosen, rejected) labelled before this
            run, such as the ones the discriminator was trained on; its updates keep them.
            They do not count as labels spent in this run.
        and every DPO option (see `pref.plugins.dpo.DPO`).
    Writes the discriminator and its gold pairs (`gold_pairs.jsonl`) to `<run>/discriminator/`.
    """

    needs = replace(DPO.needs, online=True, samples_per_prompt=2, own_reward=True, second_model=True, dataset_builder="prompts")

    def __init__(
        self,
        gold: str | RewardSource = "bag-of-words",
        gold_options: dict[str, Any] | None = None,
        discriminator: str | None = None,
        round_size: int = 64,
        budget: int = 8,
        selection: str = "confidence",
        disc_epochs: int = 4,
        disc_lr: float = 1e-4,
        disc_batch_size: int = 16,
        eval_gold: bool = True,
        gold_pairs: str | None = None,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference_free: bool = False,
        loss_weights: str | float | list[float] | None = None,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        registry: Any = None,
        processes: Processes | None = None,
    ):
        super().__init__(
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, sft_weight=sft_weight, reference_free=reference_free,
            loss_weights=loss_weights, ld_alpha=ld_alpha, use_weighting=use_weighting, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, sync_ref_model=sync_ref_model,
            ref_model_mixup_alpha=ref_model_mixup_alpha, ref_model_sync_steps=ref_model_sync_steps,
        )
        if selection not in SELECTIONS:
            raise PrefError(f"unknown D2PO selection {selection!r}: choose one of {', '.join(SELECTIONS)}")
        for name, value in (("round_size", round_size), ("disc_epochs", disc_epochs), ("disc_batch_size", disc_batch_size)):
            if value < 1:
                raise PrefError(f"d2po: {name} must be at least 1, got {value}")
        if budget < 0:
            raise PrefError(f"d2po: budget must not be negative, got {budget}")
        if disc_lr <= 0:
            raise PrefError(f"d2po: disc_lr must be positive, got {disc_lr}")
        if isinstance(gold, str):
            if registry is None:
                raise PrefError("d2po: a gold reward given by name is built from the plugin registry: build d2po with registry.create")
            gold = registry.create("reward", gold, gold_options or {})
        if gold.columns or gold.reads_completion_ids:
            what = f"the columns {', '.join(gold.columns)} of a prompt's row" if gold.columns else "the sampled token ids of each completion"
            raise PrefError(f"d2po: the gold reward reads {what}, which the pairs it labels do not carry; choose another gold reward")
        self.gold = gold
        self.discriminator_path = discriminator
        self.round_size, self.budget, self.selection = round_size, budget, selection
        self.disc_epochs, self.disc_lr, self.disc_batch_size = disc_epochs, disc_lr, disc_batch_size
        self.eval_gold = eval_gold
        self.initial_gold_pairs = read_gold_pairs(gold_pairs) if gold_pairs else []
        # built now, so the run's plan has its reward and selector before the model loads; the
        # discriminator's model is attached in setup(), once the policy it starts from has loaded
        self.discriminator = Discriminator(None, disc_lr, disc_epochs, disc_batch_size, list(self.gold.default_prompts), processes, self.gold)
        self.relabeler = DiscriminatorRelabeler(self.discriminator, self.gold, round_size, budget, selection, eval_gold)
        self.relabeler.gold_pairs = list(self.initial_gold_pairs)
        self.discriminator.gold_pairs = list(self.initial_gold_pairs)

    def setup(self, policy: Policy) -> None:
        """Build the discriminator from the policy (or load it); the loop places and trains it."""
        assert isinstance(policy, HFPolicy)
        super().setup(policy)
        if self.discriminator_path:
            with quiet_new_heads({SCORE_HEAD}):  # a causal LM gets a new score head, which the run trains: no notice of it
                classifier = HFPolicy.load(self.discriminator_path, kind="sequence-classifier",
                                           max_length=policy.max_length, max_prompt_length=policy.max_prompt_length)
        else:
            classifier = HFPolicy(classifier_from(unwrap(policy.model), policy.tokenizer.pad_token_id), policy.tokenizer,
                                  policy.max_length, policy.max_prompt_length, template_options=policy.template_options)
        classifier.model.eval()
        self.discriminator.attach(classifier)

    def second_model(self) -> SecondModel | None:
        return self.discriminator

    def own_reward(self) -> RewardSource | None:
        return self.discriminator

    def default_selector(self, embedder: Embedder | None = None, reward: RewardSource | None = None) -> PairSelector:
        return self.relabeler

    def save(self, output_dir: str) -> None:
        """The discriminator in Hugging Face format, and its gold pairs as a preference file."""
        if self.discriminator.classifier is None:
            return  # never set up
        path = os.path.join(output_dir, DISCRIMINATOR_DIR)
        self.discriminator.save(path)
        with open(os.path.join(path, GOLD_PAIRS_FILE), "w", encoding="utf-8") as f:
            for pair in self.discriminator.gold_pairs + self.discriminator.fresh:
                f.write(json.dumps(asdict(pair)) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """This process's gold pairs, open round and counters, and the discriminator's training pairs.

        The discriminator's weights and optimizer are the loop's to keep (a `SecondModel`)."""
        return {
            "gold_pairs": [asdict(p) for p in self.relabeler.gold_pairs],
            "round": [asdict(c) for c in self.relabeler.round],
            "counters": {"samples_in_round": self.relabeler.samples_in_round, "labels_spent": self.relabeler.labels_spent},
            "discriminator_pairs": [asdict(p) for p in self.discriminator.gold_pairs + self.discriminator.fresh],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.relabeler.gold_pairs = [GoldPair(**p) for p in state["gold_pairs"]]
        self.relabeler.round = [Candidate(**{**c, "pool_pair": None}) for c in state["round"]]
        self.relabeler.samples_in_round = state["counters"]["samples_in_round"]
        self.relabeler.labels_spent = state["counters"]["labels_spent"]
        self.discriminator.gold_pairs = [GoldPair(**p) for p in state["discriminator_pairs"]]


def read_gold_pairs(path: str) -> list[GoldPair]:
    """Gold pairs from a JSONL file of `prompt`, `chosen`, `rejected` rows (the file D2PO saves)."""
    if not os.path.isfile(path):
        raise PrefError(f"d2po: gold_pairs: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    try:
        return [GoldPair(row["prompt"], row["chosen"], row["rejected"]) for row in rows]
    except (KeyError, TypeError):
        raise PrefError(f"d2po: gold_pairs: every row of {path} needs prompt, chosen and rejected") from None


def classifier_from(causal_lm: torch.nn.Module, pad_token_id: int | None) -> torch.nn.Module:
    """A sequence classifier (num_labels=1) with a copy of `causal_lm`'s backbone and a new score head."""
    from transformers import AutoModelForSequenceClassification

    if hasattr(causal_lm, "merge_and_unload"):  # a LoRA policy: the backbone with its adapters folded in
        causal_lm = copy.deepcopy(causal_lm).merge_and_unload()
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the classifier finds each row's last token by it
    dtype = next(causal_lm.parameters()).dtype
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    model.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return model


@hookimpl
def register_objectives(register):
    register("d2po", D2PO)
