"""The DPO family's losses as small functions of log-probs: every `loss_type` of TRL 1.16's `DPOConfig`.

`dpo_loss` takes summed log-probs of chosen and rejected completions under the
policy and the reference and returns one loss per pair; the helpers build its
inputs for the options that change them (LD-DPO's length-desensitised log-probs,
WPO's pair weights). `tests/test_dpo_loss.py` checks every formula against TRL
1.16's `DPOTrainer` for the same log-probs, and by hand on three pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pref.errors import PrefError

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The f-DPO reparameterisation leaves a beta * log Z(x) term that only cancels in the chosen-minus-rejected
#: difference, so only these losses generalise to another f-divergence (as TRL 1.16 enforces).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
#: Losses that read `label_smoothing` (sigmoid as conservative DPO, a pref extension TRL's CPO shares).
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")


def loss_types_of(loss_type: str | Sequence[str]) -> list[str]:
    """"sigmoid", "sigmoid,sft" or ["sigmoid", "sft"] -> ["sigmoid", "sft"]."""
    if isinstance(loss_type, str):
        return [part.strip() for part in loss_type.split(",") if part.strip()]
    return list(loss_type)


def loss_weights_of(loss_weights: str | float | Sequence[float] | None, count: int) -> list[float]:
    """"0.8,0.2" / 0.8 / [0.8, 0.2] / None (all 1.0) -> a list of `count` floats, or `PrefError`."""
    if loss_weights is None:
        return [1.0] * count
    if isinstance(loss_weights, (int, float)):
        weights = [float(loss_weights)]
    elif isinstance(loss_weights, str):
        try:
            weights = [float(part) for part in loss_weights.split(",") if part.strip()]
        except ValueError:
            raise PrefError(f"loss_weights must be numbers separated by commas, e.g. 0.8,0.2,1.0; got {loss_weights!r}") from None
    else:
        weights = [float(weight) for weight in loss_weights]
    if len(weights) != count:
        raise PrefError(f"loss_weights has {len(weights)} values for {count} loss types; give one weight per loss_type")
    return weights


def check_options(
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    loss_weights: str | float | Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
) -> None:
    """Raise `PrefError` for an option, or a combination of options, the DPO loss cannot use.

    The combinations TRL 1.16 rejects are rejected here too: an f-divergence with a loss
    type it does not generalise to, WPO weighting with the sorting `aot` losses, and
    `exo_pair` without label smoothing.
    """
    types = loss_types_of(loss_type)
    if not types:
        raise PrefError(f"loss_type is empty: choose one or more of {', '.join(LOSS_TYPES)}")
    for name in types:
        if name not in LOSS_TYPES:
            raise PrefError(f"unknown DPO loss_type {name!r}: choose one or more of {', '.join(LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise PrefError(f"loss_type {','.join(types)} names a loss twice; give each once (with its weight in loss_weights)")
    loss_weights_of(loss_weights, len(types))
    if beta <= 0:
        raise PrefError(f"DPO beta must be positive, got {beta}")
    if label_smoothing and not set(types) & set(SMOOTHED_LOSS_TYPES):
        raise PrefError(f"label_smoothing only applies to loss_type {', '.join(SMOOTHED_LOSS_TYPES)}, not {','.join(types)}; set it to 0")
    if not 0.0 <= label_smoothing < 0.5:
        # at 0.5 the labels carry no information (and robust DPO divides by 1 - 2 * label_smoothing)
        raise PrefError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in types and label_smoothing == 0.0:
        raise PrefError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if f_divergence_type not in F_DIVERGENCES:
        raise PrefError(f"unknown f_divergence_type {f_divergence_type!r}: choose one of {', '.join(F_DIVERGENCES)}")
    if f_divergence_type != "reverse_kl":
        unsupported = [name for name in types if name not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise PrefError(
                f"f_divergence_type {f_divergence_type} does not apply to loss_type {','.join(unsupported)}; "
                f"use it with {', '.join(F_DIVERGENCE_LOSS_TYPES)} or keep f_divergence_type=reverse_kl"
            )
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise PrefError(f"ld_alpha must lie in [0, 1] (1 is plain DPO), got {ld_alpha}")
    if use_weighting and set(types) & {"aot", "aot_unpaired"}:
        raise PrefError("use_weighting (WPO) does not apply to loss_type aot or aot_unpaired, which sort the pairs; drop one of them")
    if discopop_tau <= 0:
        raise PrefError(f"discopop_tau must be positive, got {discopop_tau}")


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) of the f-DPO paper (Wang et al. 2023, https://arxiv.org/abs/2309.16240), from log-ratios.

    Args:
        logratios: [B] log pi(y|x) - log pi_ref(y|x).
        f_divergence_type: "reverse_kl" (DPO: the log-ratio itself), "forward_kl" (1 - 1/t),
            "js_divergence" (log 2t/(t+1)) or "alpha_divergence" ((t^(a-1) - 1)/(a-1)).
        f_alpha_divergence_coef: a of the alpha-divergence; a = 1 is reverse KL.

    Returns:
        [B] scores that replace the log-ratios in the chosen-minus-rejected difference.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:  # the limit a -> 1 is log t
            return logratios
        t = (f_alpha_divergence_coef - 1.0) * logratios
        # clamped as TRL does so exp() stays finite after casting back to half precision
        clamp_max = {torch.float16: 11.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (f_alpha_divergence_coef - 1.0)
    raise PrefError(f"unknown f_divergence_type {f_divergence_type!r}: choose one of {', '.join(F_DIVERGENCES)}")


def length_desensitised_logps(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's sequence log-probs (Liu et al. 2024, https://arxiv.org/abs/2409.06411, Eq. 9).

    The first min(len chosen, len rejected) completion tokens of each pair count fully, the
    longer answer's extra tokens are weighted by `ld_alpha`, so verbosity earns less.

    Args:
        chosen_token_logps: [B, T] per-token log-probs, 0 off the completion.
        rejected_token_logps: [B, T'] the same for the rejected completions.
        chosen_mask: [B, T] 1 on the completion tokens that were scored.
        rejected_mask: [B, T'] the same for the rejected completions.
        ld_alpha: weight of the tokens past the shared length, in [0, 1] (1: plain summed log-probs).

    Returns:
        chosen [B] and rejected [B] weighted sums.
    """
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)

    def weighted(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = mask.cumsum(-1) * mask  # 1, 2, ... along the completion, 0 elsewhere
        head = (position > 0) & (position <= shared)
        tail = position > shared
        return (token_logps * head).sum(-1) + ld_alpha * (token_logps * tail).sum(-1)

    return weighted(chosen_token_logps, chosen_mask), weighted(rejected_token_logps, rejected_mask)


def wpo_weights(token_logps: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2), without grad.

    exp(mean over completion tokens of [log p(token) - log sum_v p(v)^2]): how likely the
    policy is to produce the completion, aligned so a confident policy is not favoured.

    Args:
        token_logps: [B, T] per-token log-probs of the completion, 0 elsewhere.
        logits: [B, T, V] logits aligned with the tokens (logits[:, t] predicts token t).
        mask: [B, T] 1 on completion tokens.

    Returns:
        [B] weights; a pair's weight is the chosen one's times the rejected one's.
    """
    with torch.no_grad():
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_sum_sq_probs = torch.logsumexp(2 * log_probs, dim=-1)
        aligned = (token_logps.detach() - log_sum_sq_probs) * mask
        return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    loss_weights: str | float | Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_token_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and implicit rewards.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: [B] the same for the rejected completions.
        reference_chosen_logps: [B] summed log-probs of the chosen completions under the reference.
        reference_rejected_logps: [B] the same for the rejected completions.
        beta: strength of the pull towards the reference (IPO's tau).
        loss_type: one name, or several (a list or "a,b") whose losses are added with `loss_weights`
            (MPO, Wang et al. 2024). With m = beta x (chosen - rejected log-ratio):
            "sigmoid": DPO, Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290), Eq. 7: -log sigmoid(m).
                With `label_smoothing` > 0 it is conservative DPO (cDPO, Mitchell 2023).
            "hinge": SLiC's hinge, Zhao et al. 2023 (https://arxiv.org/abs/2305.10425): relu(1 - m).
            "ipo": IPO, Azar et al. 2023 (https://arxiv.org/abs/2310.12036), Eq. 17, on per-token
                average log-ratios when the lengths are given (as TRL does).
            "exo_pair": EXO, Ji et al. 2024 (https://arxiv.org/abs/2402.00856), Eq. 16: KL from the
                softmax over the pair to [1 - label_smoothing, label_smoothing].
            "nca_pair": NCA, Chen et al. 2024 (https://arxiv.org/abs/2402.05369): absolute rewards.
            "robust": robust DPO, Chowdhury et al. 2024 (https://arxiv.org/abs/2403.00409), Eq. 8.
            "bco_pair": BCO, Jung et al. 2024 (https://arxiv.org/abs/2404.04656), on the pair's rewards
                as TRL 1.16 computes it (no running reward shift).
            "sppo_hard": SPPO, Wu et al. 2024 (https://arxiv.org/abs/2405.00675), with hard 0/1 win probabilities.
            "aot", "aot_unpaired": AOT, Melnyk et al. 2024 (https://arxiv.org/abs/2406.05882): DPO on the
                sorted log-ratio margins (paired) or sorted chosen/rejected log-ratios (unpaired).
            "apo_zero", "apo_down": APO, D'Oosterlinck et al. 2024 (https://arxiv.org/abs/2408.06266), Eqs. 7, 8.
            "discopop": DiscoPOP, Chris Lu et al. 2024 (https://arxiv.org/abs/2406.08414), Eq. 5.
            "sft": the mean per-token NLL of the chosen completions (`chosen_token_nll`), the same for every pair.
            "sigmoid_norm": DPO on per-token average log-ratios (needs the lengths).
        label_smoothing: label noise for sigmoid (cDPO), robust, exo_pair (its epsilon) and the aot losses.
        reference_free: ignore the reference log-probs (treat them as 0).
        chosen_lengths: [B] completion token counts, for "ipo" and "sigmoid_norm"; None means 1.
        rejected_lengths: [B] the same for the rejected completions.
        loss_weights: one weight per loss type (default 1.0 each).
        f_divergence_type, f_alpha_divergence_coef: the divergence of f-DPO (see `f_divergence_scores`).
        discopop_tau: DiscoPOP's temperature.
        chosen_token_nll: [] mean NLL over all chosen completion tokens of the batch; needed by "sft".
        pair_weights: [B] WPO weights (see `wpo_weights`), multiplying every loss type's per-pair losses.

    Returns:
        losses: [B] the weighted sum of the loss types' per-pair losses (the caller averages);
            its mean equals TRL's loss.
        chosen_rewards: [B] beta * (policy - reference) log-probs of the chosen completions, detached.
        rejected_rewards: [B] the same for the rejected completions.
    """
    types = loss_types_of(loss_type)
    check_options(beta, types, label_smoothing, loss_weights, f_divergence_type, discopop_tau=discopop_tau, use_weighting=pair_weights is not None)
    weights = loss_weights_of(loss_weights, len(types))
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    margin = beta * (chosen_scores - rejected_scores)

    def per_token(scores: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        # summed log-probs would make a squared loss grow with completion length; TRL averages over tokens
        return scores if lengths is None else scores / lengths.to(scores.dtype).clamp(min=1)

    def smoothed(delta: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing

    losses = torch.zeros_like(margin)
    for name, weight in zip(types, weights):
        if name == "sigmoid":
            part = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
        elif name == "hinge":
            part = torch.relu(1 - margin)
        elif name == "ipo":
            delta = per_token(chosen_scores, chosen_lengths) - per_token(rejected_scores, rejected_lengths)
            part = (delta - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            epsilon = torch.tensor(label_smoothing, dtype=margin.dtype, device=margin.device)
            part = torch.sigmoid(margin) * (F.logsigmoid(margin) - torch.log1p(-epsilon)) + torch.sigmoid(-margin) * (
                F.logsigmoid(-margin) - torch.log(epsilon)
            )
        elif name == "nca_pair":
            chosen_reward, rejected_reward = beta * chosen_logratios, beta * rejected_logratios
            part = -F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward) - 0.5 * F.logsigmoid(-rejected_reward)
        elif name == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(margin)
            flipped = -label_smoothing * F.logsigmoid(-margin)
            part = (clean - flipped) / (1 - 2 * label_smoothing)
        elif name == "bco_pair":
            part = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif name == "sppo_hard":
            part = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif name == "aot":
            policy_sorted, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
            reference_sorted, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
            part = smoothed(policy_sorted - reference_sorted)
        elif name == "aot_unpaired":
            chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
            rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
            part = smoothed(chosen_sorted - rejected_sorted)
        elif name == "apo_zero":
            part = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":
            part = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        elif name == "discopop":
            modulation = torch.sigmoid(margin / discopop_tau)
            part = -F.logsigmoid(margin) * (1 - modulation) + torch.exp(-margin) * modulation
        elif name == "sft":
            if chosen_token_nll is None:
                raise PrefError("loss_type sft needs the chosen completions' token NLL (chosen_token_nll)")
            part = chosen_token_nll.expand_as(margin)
        else:  # sigmoid_norm
            delta = per_token(chosen_scores, chosen_lengths) - per_token(rejected_scores, rejected_lengths)
            part = -F.logsigmoid(beta * delta)
        if pair_weights is not None:
            part = part * pair_weights
        losses = losses + weight * part

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
