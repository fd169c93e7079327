"""Reward models: a one-score head on a transformers backbone, trained on preference pairs.

The `reward-model` objective trains one offline with the Bradley-Terry loss
(`pref run --objective reward-model --dataset prefs.jsonl`); the
`reward-model` reward scores completions with a saved one
(`--reward reward-model --reward-option model=runs/.../final`). D2PO's
discriminator is the same kind of model (see `pref.plugins.d2po`).

Prompt and completion are encoded exactly as the policy encodes them
(`HFPolicy.encode`: chat template, one EOS), and the score is the head's
output at the last real token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import NO_REFERENCE, PAIRS, Objective, ObjectiveNeeds, PairBatch, Policy, Reference, RewardSource
from pref.policy import HFPolicy, unwrap
from pref.sequences import Sequences


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley-Terry losses, as TRL's `RewardTrainer` computes them.

    Args:
        chosen_rewards: [B] scores of the preferred completions.
        rejected_rewards: [B] scores of the others.
        margin: how far the chosen score should beat the rejected one (a float or [B]).
        center_rewards_coefficient: weight of (chosen + rejected)^2, which keeps the
            scores centred on zero (Eisenstein et al. 2023).

    Returns:
        losses: [B] -log sigmoid(chosen - rejected - margin) + coefficient x (chosen + rejected)^2.
    """
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


def sequence_scores(model: torch.nn.Module, sequences: Sequences) -> torch.Tensor:
    """The one-score head's output [B] for each row (with grad if enabled)."""
    device = next(unwrap(model).parameters()).device
    sequences = sequences.to(device)
    return model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits[:, 0]


def pair_scores(model: torch.nn.Module, batch: PairBatch, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B] of the chosen and of the rejected rows, from one forward pass over the 2B rows."""
    n = len(batch)
    rows = Sequences.concat([batch.chosen, batch.rejected], pad_id=0 if pad_id is None else pad_id)
    scores = sequence_scores(model, rows)
    return scores[:n], scores[n:]


class RewardModel(Objective):
    """Trains a reward model (a one-score head) on preference pairs with the Bradley-Terry loss.

    Options:
        margin: how far the chosen score should beat the rejected one (default 0).
        center_rewards_coefficient: weight of the (chosen + rejected)^2 term that keeps
            scores centred on zero (default 0; TRL suggests 0.01).
    The trained model is saved in `final/` as an `AutoModelForSequenceClassification`
    (num_labels=1) that `--reward reward-model --reward-option model=PATH` loads.
    """

    needs = ObjectiveNeeds(reference=NO_REFERENCE, data=PAIRS, model_kind="sequence-classifier")

    def __init__(self, margin: float = 0.0, center_rewards_coefficient: float = 0.0):
        if center_rewards_coefficient < 0:
            raise PrefError(f"reward-model: center_rewards_coefficient must not be negative, got {center_rewards_coefficient}")
        self.margin = float(margin)
        self.center_rewards_coefficient = float(center_rewards_coefficient)

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean Bradley-Terry loss and TRL RewardTrainer's metrics (accuracy, margin, min/mean/max_reward).

        The mean scores of the chosen and of the rejected answers are logged as `chosen_reward` and `rejected_reward`,
        after TRL's `mean_reward`: `rewards/chosen` is DPO's implicit reward, another quantity.
        """
        chosen, rejected = pair_scores(policy.model, batch, policy.tokenizer.pad_token_id)
        losses = bradley_terry_loss(chosen, rejected, self.margin, self.center_rewards_coefficient)
        rewards = torch.cat([chosen, rejected]).detach()
        metrics = {
            "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).detach().mean().item(),
            "chosen_reward": chosen.detach().mean().item(),
            "rejected_reward": rejected.detach().mean().item(),
            "mean_reward": rewards.mean().item(),
            "min_reward": rewards.min().item(),
            "max_reward": rewards.max().item(),
        }
        return losses.mean(), metrics


class SequenceScorer:
    """A sequence classifier (num_labels=1) and its tokenizer, scoring prompt/completion pairs.

    `classifier` is an `HFPolicy` whose model is the classifier: its `encode` is the policy's.
    """

    def __init__(self, classifier: HFPolicy, batch_size: int = 32):
        if batch_size < 1:
            raise PrefError(f"reward model batch_size must be at least 1, got {batch_size}")
        self.classifier = classifier
        self.batch_size = batch_size

    @property
    def model(self) -> torch.nn.Module:
        return self.classifier.model

    def scores(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        """Scores [B] on the CPU, in batches of `batch_size`, without grad and in eval mode."""
        model = self.classifier.model
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(completions), self.batch_size):
                end = start + self.batch_size
                out.append(sequence_scores(model, self.classifier.encode(prompts[start:end], completions[start:end])).float().cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class RewardModelReward(RewardSource):
    """Scores completions with a saved reward model (a sequence classifier with one score).

    Options:
        model: path or hub id of the model (`final/` of a `reward-model` run, or D2PO's `discriminator/`).
        batch_size: rows per forward pass (default 32).
        device: "auto" (a GPU if there is one), "cpu", "cuda" or "mps".
    """

    def __init__(self, model: str | None = None, batch_size: int = 32, device: str = "auto"):
        if not model:
            raise PrefError("reward-model: pass the model to score with: --reward-option model=PATH")
        classifier = HFPolicy.load(model, kind="sequence-classifier")
        classifier.model.to(pick_device(device))
        self.scorer = SequenceScorer(classifier, batch_size)

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, Any]:
        """`reward`: the model's score, float [B]."""
        return {"reward": self.scorer.scores(prompts, completions)}


@hookimpl
def register_objectives(register):
    register("reward-model", RewardModel)


@hookimpl
def register_rewards(register):
    register("reward-model", RewardModelReward)
