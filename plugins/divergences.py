"""Divergences between two next-token distributions, per position, from logits.

Every function takes two tensors of shape [..., V] holding logits or
log-probabilities (they are log-softmaxed here, which leaves log-probs as they
are) and returns one divergence per position, shape [...]. All the maths stays
in log space, so a token with a tiny probability under either distribution
neither underflows to a NaN nor blows up.

`p` is the first argument and `q` the second: PMPO's D(pi_ref || pi) is
`divergence(name, reference_logits, policy_logits)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pref.errors import PrefError

DIVERGENCES = ("kl", "js", "renyi")


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    # half-precision logits (autocast) are widened; float64 stays float64
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # a token p gives probability 0 (logit -inf) contributes 0, not 0 x inf = NaN
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)), in nats.

    Args:
        p_logits: [..., V] logits (or log-probs) of p.
        q_logits: [..., V] logits (or log-probs) of q.

    Returns:
        [...] the divergence at each position; 0 where p == q, never negative.
    """
    return _kl_from_log_probs(_log_probs(p_logits), _log_probs(q_logits))


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence: (KL(p || m) + KL(q || m)) / 2 with the mixture m = (p + q) / 2.

    Symmetric and bounded by log 2 nats. log m = logsumexp(log p, log q) - log 2.

    Args:
        p_logits: [..., V] logits (or log-probs) of p.
        q_logits: [..., V] logits (or log-probs) of q.

    Returns:
        [...] the divergence at each position, in [0, log 2].
    """
    log_p, log_q = _log_probs(p_logits), _log_probs(q_logits)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (_kl_from_log_probs(log_p, log_m) + _kl_from_log_probs(log_q, log_m))


def renyi_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, order: float) -> torch.Tensor:
    """Renyi divergence of order a: D_a(p || q) = log(sum_v p(v)^a q(v)^(1 - a)) / (a - 1).

    Tends to KL(p || q) as a -> 1; a = 0.5 gives -2 log of the Bhattacharyya
    coefficient. Computed as logsumexp(a log p + (1 - a) log q) / (a - 1).

    Args:
        p_logits: [..., V] logits (or log-probs) of p.
        q_logits: [..., V] logits (or log-probs) of q.
        order: a > 0 and a != 1.

    Returns:
        [...] the divergence at each position; 0 where p == q.
    """
    check_renyi_order(order)
    log_p, log_q = _log_probs(p_logits), _log_probs(q_logits)
    return torch.logsumexp(order * log_p + (1.0 - order) * log_q, dim=-1) / (order - 1.0)


def check_renyi_order(order: float) -> None:
    """Raise `PrefError` unless the Renyi order is positive and not 1."""
    if not order > 0 or order == 1:
        raise PrefError(f"renyi_alpha (the Renyi order) must be positive and not 1, got {order}; use divergence kl for order 1")


def divergence(name: str, p_logits: torch.Tensor, q_logits: torch.Tensor, renyi_alpha: float = 0.5) -> torch.Tensor:
    """D(p || q) per position [...] for the divergence `name` ("kl", "js" or "renyi" of order `renyi_alpha`)."""
    if name == "kl":
        return kl_divergence(p_logits, q_logits)
    if name == "js":
        return js_divergence(p_logits, q_logits)
    if name == "renyi":
        return renyi_divergence(p_logits, q_logits, renyi_alpha)
    raise PrefError(f"unknown divergence {name!r}: choose one of {', '.join(DIVERGENCES)}")
