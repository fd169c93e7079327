"""A run that diverges stops at once, with the model it had before: nothing non-finite is trained on or saved.

A setting that is `inf`/`nan` is refused before anything loads; each step's loss and gradient norm
are checked before the optimizer step, and the weights before a checkpoint or the final model is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from pref.errors import PrefError


def refuse_non_finite_settings(config: Any) -> None:
    """A `PrefError` naming the first setting or plugin option of `config` (--lr, --beta, ...) that is `inf` or `nan`."""
    for name, value in _numbers(config.to_dict()):
        if not math.isfinite(value):
            section, _, key = name.rpartition(".")
            label = f"{section.split('.')[0].removesuffix('_options').replace('_', ' ')} option {key!r}" if section else "--" + name.replace("_", "-")
            raise PrefError(f"{label} is {value}: a run with it cannot train; give a finite number")


def _numbers(values: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield prefix + key, value


def likely_causes(config: Any) -> str:
    beta = config.objective_options.get("beta")
    return f"lower --lr (now {config.lr:g})" + (f" or --beta (now {beta:g})" if isinstance(beta, (int, float)) else " or the objective's beta")


def check_step(step: int, loss: float, grad_norm: float, config: Any) -> str | None:
    """The one-line message if `loss` or `grad_norm` of `step` is not finite, else None.

    The loop checks it before the optimizer step, so the weights stay those of the last good step.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    return (f"training diverged at step {step}: loss {loss:g}, gradient norm {grad_norm:g}; stopped before updating the weights, "
            f"kept checkpoints are from earlier steps; {likely_causes(config)}")


def check_weights(parameters: Iterable[torch.Tensor], step: int, config: Any) -> None:
    """Raise a `PrefError` if any of `parameters` holds a non-finite value (before saving them)."""
    from torch.distributed.tensor import DTensor

    parameters = [p.detach() for p in parameters]
    # foreach cannot mix sharded weights with whole ones (PPO's value head in a sharded run); a sharded group's answer is agreed by all
    groups = [[p for p in parameters if isinstance(p, DTensor)], [p for p in parameters if not isinstance(p, DTensor)]]
    if not all(bool(torch.stack(torch._foreach_norm(group)).isfinite().all()) for group in groups if group):
        raise PrefError(f"training diverged by step {step}: the weights are no longer finite, so they were not saved; "
                        f"{likely_causes(config)}")


def sampled_non_finite(exc: BaseException) -> bool:
    """True for torch's refusal to sample from probabilities holding inf, nan or negative values: a policy that already diverged."""
    return isinstance(exc, RuntimeError) and "probability tensor contains either `inf`, `nan` or element < 0" in str(exc)


def sampling_diverged(step: int, config: Any) -> str:
    return (f"training diverged by step {step}: the policy's next-token probabilities are no longer finite, so it cannot "
            f"sample; kept checkpoints are from earlier steps; {likely_causes(config)}")
