"""A frozen reference that moves during training, as TRL's `sync_ref_model` and BEMA move it.

An objective holding a `MovingReference` in `self.moving` (and declaring `needs.moves_reference`) takes
`MovesReference`'s methods; the loop calls them after each optimizer step and to checkpoint the state.

- `SyncReference`, TR-DPO (Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656, Eq. 6): every `ref_model_sync_steps`
  optimizer steps, reference <- alpha * policy + (1 - alpha) * reference, as TRL's `SyncRefModelCallback`, which its
  DPO, KTO, GRPO and RLOO trainers take with `sync_ref_model`.
- `BEMA`, Block and Zhang 2025, "EMA Without the Lag" (https://arxiv.org/abs/2508.00180), as TRL 1.16's
  `trl.experimental.bema_for_ref_model` applies it to DPO's reference: every `update_freq` steps t (counted after
  `update_after`) the averaged weights become

    ema_t     = (1 - beta_t) * ema + beta_t * theta_t,        beta_t  = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)
    averaged  = ema_t + alpha_t * (theta_t - theta_0),         alpha_t = (lag + multiplier * t) ** -bias_power

  where theta_t is the policy's weights and theta_0 their value at `update_after` (the start when 0), and every
  `ref_model_update_freq` steps (counted after `ref_model_update_after`) the reference takes the averaged weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pref.errors import PrefError
from pref.interfaces import Policy, Reference
from pref.policy import unwrap
from pref.reference import FrozenReference


class MovingReference(ABC):
    """How a reference moves: after each optimizer step, given the policy's and the reference's models."""

    option = ""  # the objective option that asked for it, for errors

    def setup(self, policy_model: torch.nn.Module) -> None:
        """Called with the policy's model once it is loaded."""

    def state(self, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Tensors that decide how it moves on, for checkpoints (`Objective.reference_state`); by default none."""
        return {}

    @abstractmethod
    def after_step(self, step: int, policy_model: torch.nn.Module, reference: torch.nn.Module) -> None:
        """Move `reference` (in place) at the end of optimizer step `step` (from 1)."""


@torch.no_grad()
def mix_into_reference(reference_model: torch.nn.Module, policy_model: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update, in place: every reference parameter becomes alpha * policy + (1 - alpha) * reference,
    as TRL's `SyncRefModelCallback` does; alpha = 1 copies the policy. Under `--fsdp` both models are sharded alike, so
    each process mixes its own pieces."""
    for target, source in zip(reference_model.parameters(), policy_model.parameters(), strict=True):
        target.mul_(1.0 - alpha).add_(source.to(target.device, target.dtype), alpha=alpha)


class SyncReference(MovingReference):
    """TRL's `sync_ref_model` with `ref_model_mixup_alpha` and `ref_model_sync_steps`."""

    option = "sync_ref_model"

    def __init__(self, ref_model_mixup_alpha: float = 0.6, ref_model_sync_steps: int = 512):
        if not 0.0 < ref_model_mixup_alpha <= 1.0:
            raise PrefError(f"ref_model_mixup_alpha must lie in (0, 1], got {ref_model_mixup_alpha}")
        if ref_model_sync_steps < 1:
            raise PrefError(f"ref_model_sync_steps must be at least 1, got {ref_model_sync_steps}")
        self.alpha, self.steps = ref_model_mixup_alpha, ref_model_sync_steps

    def after_step(self, step: int, policy_model: torch.nn.Module, reference: torch.nn.Module) -> None:
        if step % self.steps == 0:
            mix_into_reference(reference, policy_model, self.alpha)


class MovesReference:
    """The `Objective` methods of one whose `self.moving` (a `MovingReference`, or None) moves its frozen reference.

    Put it before `Objective` among the bases, and set `needs.moves_reference` (with a frozen model,
    `REFERENCE_DISTRIBUTIONS`) where `self.moving` is set.
    """

    moving: MovingReference | None = None

    def setup(self, policy: Policy) -> None:
        if self.moving is not None:
            self.moving.setup(policy.model)

    def reference_state(self, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.moving.state(reference) if self.moving is not None else {}

    def after_step(self, step: int, policy: Policy, reference: Reference | None) -> None:
        if self.moving is None or reference is None:
            return
        if not isinstance(reference, FrozenReference):
            raise PrefError(f"{self.moving.option} needs a frozen reference model, not cached log-probs: use --reference model")
        self.moving.after_step(step, unwrap(policy.model), reference.model)


class BEMA(MovingReference):
    """The averages of one run's trainable weights, and when they move the reference. TRL's `BEMACallback` names."""

    option = "bema_reference"

    def __init__(self, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2, lag: float = 10.0,
                 update_after: int = 0, multiplier: float = 1.0, min_ema_multiplier: float = 0.0,
                 ref_model_update_freq: int = 400, ref_model_update_after: int = 0):
        if update_freq < 1 or ref_model_update_freq < 1:
            raise PrefError(f"bema_update_freq and ref_model_update_freq must be at least 1, got {update_freq} and {ref_model_update_freq}")
        if update_after < 0 or ref_model_update_after < 0:
            raise PrefError(f"bema_update_after and ref_model_update_after must not be negative, got {update_after} and {ref_model_update_after}")
        if lag <= 0 or multiplier < 0 or ema_power < 0 or bias_power < 0:
            raise PrefError("bema_lag must be positive, and bema_multiplier, bema_ema_power and bema_bias_power not negative")
        if not 0.0 <= min_ema_multiplier <= 1.0:
            raise PrefError(f"bema_min_ema_multiplier must lie in [0, 1], got {min_ema_multiplier}")
        self.update_freq, self.ema_power, self.bias_power, self.lag = update_freq, ema_power, bias_power, lag
        self.update_after, self.multiplier, self.min_ema_multiplier = update_after, multiplier, min_ema_multiplier
        self.ref_model_update_freq, self.ref_model_update_after = ref_model_update_freq, ref_model_update_after
        self.trainable: set[str] = set()  # the policy's weights that train, by name
        self.theta0: dict[str, torch.Tensor] = {}
        self.ema: dict[str, torch.Tensor] = {}
        self.averaged: dict[str, torch.Tensor] = {}  # what the reference takes at its next update

    def setup(self, policy_model: torch.nn.Module) -> None:
        self.trainable = {name for name, weight in policy_model.named_parameters() if weight.requires_grad}

    def ema_beta(self, step: int) -> float:
        return max((self.lag + self.multiplier * step) ** -self.ema_power, self.min_ema_multiplier)

    def bias_alpha(self, step: int) -> float:
        return (self.lag + self.multiplier * step) ** -self.bias_power

    def state(self, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The averages, by name, for checkpoints; made on the first call from `reference`, a frozen copy of the starting policy.

        Float32 copies of the trained weights, on the CPU (three copies in all, as TRL keeps them); under --fsdp, where
        each process holds a piece of every weight, they are cut and placed like it.
        """
        if not self.theta0:
            from torch.distributed.tensor import DTensor

            for name, weight in reference.named_parameters():
                if name in self.trainable:
                    start = weight.detach().to(torch.float32)
                    start = start if isinstance(start, DTensor) else start.cpu()
                    self.theta0[name], self.ema[name], self.averaged[name] = start.clone(), start.clone(), start.clone()
        return {f"{kind}/{name}": tensor for kind, tensors in (("theta0", self.theta0), ("ema", self.ema), ("averaged", self.averaged))
                for name, tensor in tensors.items()}

    @torch.no_grad()
    def after_step(self, step: int, policy_model: torch.nn.Module, reference: torch.nn.Module) -> None:
        """TRL's order at the end of optimizer step `step` (from 1): the averages first, then the reference."""
        self.state(reference)
        weights = {name: weight for name, weight in policy_model.named_parameters() if name in self.theta0}
        if step == self.update_after:
            for name, weight in weights.items():
                self.theta0[name].copy_(weight)
                self.ema[name].copy_(weight)
        elif step > self.update_after and (step - self.update_after) % self.update_freq == 0:
            beta, alpha = self.ema_beta(step), self.bias_alpha(step)
            for name, weight in weights.items():
                theta = weight.detach().to(self.ema[name].device, torch.float32)
                self.ema[name].mul_(1 - beta).add_(theta, alpha=beta)
                self.averaged[name].copy_(self.ema[name] + alpha * (theta - self.theta0[name]))
        if step >= self.ref_model_update_after and (step - self.ref_model_update_after) % self.ref_model_update_freq == 0:
            for name, weight in reference.named_parameters():
                if name in self.averaged:
                    weight.copy_(self.averaged[name])
