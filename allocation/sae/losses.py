"""Losses: reconstruction MSE, FVU, and the auxiliary losses aux_k_loss and aux_zipf_loss.

Every squared error is reduced by ``reduce_squared_error`` with the same ``reduction`` as the main
loss ('mean': mean over tokens of the squared L2 error; 'sum': total), and every loss is normalised
by a variance under that same reduction: the main loss (``normalized_mse``) by the input's, the
auxiliary losses by the residual's. Main and auxiliary losses are then in the same (scale-free)
units, whatever the reduction, the batch size or the activations' scale.

Both auxiliary losses reconstruct the *detached* residual e = x - x_hat from extra activations,
decoded WITHOUT b_dec (the residual has no bias to learn), and are normalised by the residual's
variance:

    aux = alpha * scale * R(||e_hat - e||^2) / R(||e - mean(e)||^2),   alpha = 1/32.

aux_k_loss (Gao et al. 2024): the extra activations are each token's top-k_aux pre-activations
among dead features; scale = min(n_dead / k_aux, 1), k_aux = d_in // 2 by default.

aux_zipf_loss (this package): the extra activations are a Feature Choice allocation over the
pre-activations not already active, with capacities proportional to each feature's deficit against
a Zipf usage target (see ``zipf_targets``, ``deficits`` and ``aux_zipf_loss``).

``scope`` (``allocation.sae.distributed``): under data-parallel training each rank's loss is its
share of the global batch's, R over its rows / (the batch's token count for 'mean') / the global
variance; the shares sum to the single-process loss of the whole batch. Default: one process.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from .._validate import positive_int
from ..constraints import Constraints
from ..errors import AllocationError
from ..rules import allocate_unchecked
from ..zipf import largest_remainders, water_fill, zipf_weights
from .distributed import LOCAL, BatchScope
from .metrics import UNDER_USED_FACTOR, under_used
from .sparse import decode_mask

ALPHA_AUX = 1.0 / 32.0
REDUCTIONS = ("mean", "sum")


def reduce_squared_error(squared: Tensor, reduction: str = "mean") -> Tensor:
    """Reduce squared errors (n, d): 'mean' = mean_i sum_d, 'sum' = sum_i sum_d."""
    if reduction == "mean":
        return squared.sum(dim=-1).mean()
    if reduction == "sum":
        return squared.sum()
    raise AllocationError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def mse_loss(x: Tensor, x_hat: Tensor, reduction: str = "mean") -> Tensor:
    """Reconstruction loss R(||x - x_hat||^2), R the reduction over tokens."""
    return reduce_squared_error((x_hat - x).pow(2), reduction)


def normalized_mse(x: Tensor, x_hat: Tensor, reduction: str = "mean", scope: BatchScope = LOCAL) -> Tensor:
    """Main training loss R(||x - x_hat||^2) / R(||x - mean(x)||^2): the MSE in the aux losses' units.

    The aux losses are normalised by the residual's variance, so the main loss is normalised by the
    input's: both are scale-free and the 1/32 weight means the same for any activation scale.
    """
    if scope is LOCAL:
        variance = reduce_squared_error((x - x.mean(dim=0)).pow(2).detach(), reduction)
        return mse_loss(x, x_hat, reduction) / variance.clamp_min(1e-30)
    return _share(x_hat - x, reduction, scope) / _variance(x.detach(), reduction, scope).clamp_min(1e-30)


def _share(error: Tensor, reduction: str, scope: BatchScope) -> Tensor:
    """This rank's share of R(||error||^2) over the data-parallel batch: its sum / N for 'mean'."""
    total = reduce_squared_error(error.pow(2), "sum")
    if reduction == "sum":
        return total
    n_tokens = scope.loss_sum(torch.tensor(float(error.shape[0]), dtype=torch.float64, device=error.device))
    return total / n_tokens.to(total.dtype)


def _variance(x: Tensor, reduction: str, scope: BatchScope) -> Tensor:
    """R(||x - mean x||^2) over the data-parallel batch (mean and sums reduced over the ranks)."""
    n_local = torch.tensor([float(x.shape[0])], dtype=x.dtype, device=x.device)
    sums = scope.loss_sum(torch.cat([x.sum(dim=0), n_local]))
    n_tokens = sums[-1]
    squared = scope.loss_sum((x - sums[:-1] / n_tokens).pow(2).sum())
    return squared / n_tokens if reduction == "mean" else squared


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-30)


def _residual_reconstruction_loss(
    pre: Tensor, mask: Tensor, residual: Tensor, W_dec: Tensor, reduction: str, sparse: bool,
    scope: BatchScope = LOCAL,
) -> Tensor:
    """R(||e_hat - e||^2) / R(||e - mean(e)||^2) with e detached and e_hat decoded without b_dec."""
    target = residual.detach()
    e_hat = decode_mask(pre, mask, W_dec, None, sparse=sparse)
    if scope is not LOCAL:
        return _share(e_hat - target, reduction, scope) / _variance(target, reduction, scope).clamp_min(1e-30)
    variance = reduce_squared_error((target - target.mean(dim=0)).pow(2), reduction)
    return reduce_squared_error((e_hat - target).pow(2), reduction) / variance.clamp_min(1e-30)


def _check_k_aux(k_aux: Optional[int], d_in: int) -> int:
    return d_in // 2 if k_aux is None else positive_int(k_aux, "k_aux (default d_in // 2)")


def aux_k_selection(pre: Tensor, dead: Tensor, k_aux: int) -> Tuple[Tensor, float]:
    """Per token, the top-min(k_aux, n_dead) positive dead pre-activations; scale min(n_dead / k_aux, 1)."""
    n_dead = int(dead.sum())
    scores = torch.where(
        dead.to(pre.device)[None, :], pre.detach(), torch.zeros((), dtype=pre.dtype, device=pre.device)
    )
    return allocate_unchecked(scores, Constraints(per_token=min(k_aux, n_dead))), min(n_dead / k_aux, 1.0)


def aux_k_loss(
    pre: Tensor,
    residual: Tensor,
    W_dec: Tensor,
    dead: Tensor,
    *,
    k_aux: Optional[int] = None,
    coefficient: float = ALPHA_AUX,
    reduction: str = "mean",
    sparse: bool = True,
    scope: BatchScope = LOCAL,
) -> Tensor:
    """alpha min(n_dead/k_aux, 1) R(||e_hat - e||^2)/R(||e - mean e||^2), e_hat from top-k_aux dead pre-acts.

    pre: (n, F) affinities; residual: (n, d) e = x - x_hat (detached here); W_dec: (F, d);
    dead: (F,) bool. k_aux defaults to d // 2. Returns 0 (no graph) when no feature is dead.
    """
    k_aux = _check_k_aux(k_aux, residual.shape[-1])
    if not bool(dead.any()):
        return pre.new_zeros(())  # no graph: a zero gradient would make the encoder backward dense
    mask, scale = aux_k_selection(pre, dead, k_aux)
    return coefficient * scale * _residual_reconstruction_loss(pre, mask, residual, W_dec, reduction, sparse, scope)


def _ranked(usage: Tensor, s: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(order, sorted usage, weights): features by decreasing usage, and r^-s with tied usages sharing
    the mean of their ranks' weights (non-increasing along ``order``)."""
    usage = usage.detach().to(torch.float64)
    n_features = usage.numel()
    if n_features == 0:
        raise AllocationError("usage is empty")
    order = torch.sort(usage, descending=True, stable=True).indices
    ranked = usage[order]
    weights = zipf_weights(n_features, s, device=usage.device)
    _, group, counts = torch.unique_consecutive(ranked, return_inverse=True, return_counts=True)
    group_mean = torch.zeros(counts.numel(), dtype=torch.float64, device=usage.device)
    group_mean.index_add_(0, group, weights)
    return order, ranked, (group_mean / counts)[group]


def _unsort(order: Tensor, sorted_values: Tensor) -> Tensor:
    values = torch.empty_like(sorted_values)
    values[order] = sorted_values
    return values


def zipf_targets(usage: Tensor, budget: float, s: float = 1.0, cap: Optional[float] = 1.0) -> Tensor:
    """Zipf usage targets t_j = c / r_j^s summing to ``budget``, r_j = rank of feature j by usage.

    Rank 1 is the most used feature. Features with equal usage share the mean of their ranks'
    weights (so all-dead features get equal targets). With ``cap`` (usage is a firing frequency,
    which cannot exceed 1) the targets are min(c / r^s, cap) with c chosen so they still sum to
    ``budget`` (water-filling); no cap binds whenever c <= cap.
    """
    if budget < 0:
        raise AllocationError(f"budget must be >= 0, got {budget}")
    order, _, weights = _ranked(usage, s)
    return _unsort(order, water_fill(weights, budget, cap))


def fit_zipf(usage: Tensor, floor: float) -> Optional[Tuple[float, float]]:
    """(s, c) of the least-squares line log u_(r) = log c - s log r over the ranks r with u_(r) >= floor.

    u_(r) is the r-th largest usage; the low end (usage below ``floor`` > 0, dead features included)
    is left out of the fit. None when fewer than two ranks qualify. s >= 0 (usage is sorted).
    """
    if not floor > 0:
        raise AllocationError(f"floor must be > 0 (log-usage is fitted), got {floor}")
    ranked = torch.sort(usage.detach().to(torch.float64), descending=True).values
    kept = ranked[ranked >= floor]
    if kept.numel() < 2:
        return None
    log_rank = torch.arange(1, kept.numel() + 1, dtype=torch.float64, device=kept.device).log()
    log_usage = kept.log()
    centred = log_rank - log_rank.mean()
    slope = float((centred * (log_usage - log_usage.mean())).sum() / centred.pow(2).sum())
    s = max(-slope, 0.0)  # exactly >= 0 up to rounding: a non-increasing sequence has slope <= 0
    return s, float(math.exp(float(log_usage.mean()) + s * float(log_rank.mean())))


def fitted_zipf_targets(
    usage: Tensor, budget: float, floor: float, s: float = 1.0, cap: Optional[float] = 1.0
) -> Tensor:
    """Targets min(c / r_j^s, cap) from the Zipf law fitted to ``usage`` above ``floor`` (``fit_zipf``),
    tied usages sharing their ranks' mean weight; ``zipf_targets(usage, budget, s, cap)`` when no fit exists."""
    fit = fit_zipf(usage, floor)
    if fit is None:
        return zipf_targets(usage, budget, s, cap)
    s_fit, c_fit = fit
    order, _, weights = _ranked(usage, s_fit)
    targets = c_fit * weights
    return _unsort(order, targets if cap is None else targets.clamp(max=cap))


DEFICITS = ("absolute", "relative", "log_ratio")
DEFAULT_DEFICIT, DEFAULT_UNDER_USED_ONLY = "relative", True
"""aux_zipf_loss's default variant: the relative deficit of the under-used features, the variant of
benchmarks/aux_variants.py with the fewest dead + under-used features (none beat aux_k_loss there)."""
LOG_RATIO_EPS = 1e-3
"""log_ratio's eps: an unused feature's deficit is log(1 / eps) = log(1000), the largest any feature gets."""


def deficits(usage: Tensor, targets: Tensor, kind: str = "absolute") -> Tensor:
    """Deficit of each feature below its target: absolute (t - u)+, relative (1 - u/t)+, log_ratio
    (-log(u/t + eps))+ with eps = LOG_RATIO_EPS; 0 where t = 0.

    Unused features get the largest relative and log_ratio deficit, so their share of the total deficit
    grows from absolute to relative to log_ratio (-log(x + eps) / log(1 / eps) <= 1 - x on [0, 1]).
    """
    usage = usage.detach().to(torch.float64)
    targets = targets.to(torch.float64)
    if kind not in DEFICITS:
        raise AllocationError(f"deficit must be one of {', '.join(DEFICITS)}, got {kind!r}")
    if kind == "absolute":
        return (targets - usage).clamp_min(0)
    ratio = torch.where(targets > 0, usage / targets.clamp_min(1e-300), torch.ones_like(targets))
    if kind == "relative":
        return (1 - ratio).clamp_min(0)
    return (-torch.log(ratio + LOG_RATIO_EPS)).clamp_min(0)


def proportional_capacities(weights: Tensor, total: int, limit: int, *, fill: bool = True) -> Tensor:
    """Integer capacities m_j = min(c w_j, limit) summing to min(total, limit #{w_j > 0}) (water-filling, then
    largest remainders); 0 where w_j = 0.

    ``fill=False``: the rule of configs before 0.2, round(total w_j / sum w) then clamped at ``limit``
    (what a clamp cuts off is lost rather than water-filled onto the other features).
    """
    weights = weights.detach().to(torch.float64).clamp_min(0)
    capacities = torch.zeros(weights.numel(), dtype=torch.int64, device=weights.device)
    positive = torch.nonzero(weights > 0).flatten()
    if not fill:
        if total <= 0 or positive.numel() == 0:
            return capacities
        return largest_remainders(total * weights / weights.sum(), int(total)).clamp(max=limit)
    total = min(int(total), int(limit) * positive.numel())
    if total <= 0:
        return capacities
    order = positive[torch.sort(weights[positive], descending=True, stable=True).indices]
    real = water_fill(weights[order], float(total), float(limit)).clamp(0, limit)
    capacities[order] = largest_remainders(real, total).clamp(0, limit)
    return capacities


def aux_zipf_targets(
    usage: Tensor,
    budget: float,
    *,
    s: float = 1.0,
    cap: Optional[float] = 1.0,
    fit: bool = False,
    exclude_saturated: bool = False,
) -> Tensor:
    """aux_zipf_loss's usage targets: ``zipf_targets`` (fixed s) or ``fitted_zipf_targets`` (fit=True, the law
    fitted above the under-used threshold UNDER_USED_FACTOR budget / F); exclude_saturated zeroes the
    targets of the ranks the law puts at the cap (so they get no deficit)."""
    if fit:
        targets = fitted_zipf_targets(usage, budget, UNDER_USED_FACTOR * budget / usage.numel(), s, cap)
    else:
        targets = zipf_targets(usage, budget, s, cap)
    if exclude_saturated and cap is not None:
        targets = torch.where(targets >= cap * (1 - 1e-12), torch.zeros_like(targets), targets)
    return targets


def aux_zipf_capacities(
    usage: Tensor,
    budget: float,
    n_tokens: int,
    k_aux: int,
    *,
    s: float = 1.0,
    cap: Optional[float] = 1.0,
    deficit: str = DEFAULT_DEFICIT,
    fit: bool = False,
    exclude_saturated: bool = False,
    fill: bool = True,
    under_used_only: bool = DEFAULT_UNDER_USED_ONLY,
) -> Tuple[Tensor, int]:
    """(m, |D|): per-feature capacities m_j ~ deficit_j (water-filled under n_tokens, summing to
    min(k_aux, |D|) n_tokens) and the number |D| of features with a positive deficit.

    ``under_used_only``: no deficit for features used at least UNDER_USED_FACTOR budget / F (the
    metrics' under-used threshold), so only the under-used (the dead included) get auxiliary matches.
    """
    if budget < 0:
        raise AllocationError(f"budget must be >= 0, got {budget}")
    targets = aux_zipf_targets(usage, budget, s=s, cap=cap, fit=fit, exclude_saturated=exclude_saturated)
    weight = deficits(usage, targets, deficit)
    if under_used_only:
        weight = torch.where(under_used(usage, budget).to(weight.device), weight, 0.0)
    n_candidates = int((weight > 0).sum())
    total = min(k_aux, n_candidates) * n_tokens
    return proportional_capacities(weight, total, n_tokens, fill=fill), n_candidates


def aux_zipf_selection(
    pre: Tensor,
    active: Tensor,
    usage: Tensor,
    budget: float,
    k_aux: int,
    *,
    scope: BatchScope = LOCAL,
    **variant: Any,
) -> Tuple[Tensor, float]:
    """The auxiliary Feature Choice mask of aux_zipf_loss and its scale min(|D| / k_aux, 1).

    ``scope``: the batch the capacities are sized for and the Feature Choice is over. ``variant``: the
    keyword options of ``aux_zipf_capacities`` (s, cap, deficit, fit, exclude_saturated, fill, under_used_only).
    """
    n_features = pre.shape[1]
    n_tokens = scope.n_tokens(pre.shape[0])
    if usage.shape != (n_features,):
        raise AllocationError(f"usage must have shape ({n_features},), got {tuple(usage.shape)}")
    capacities, n_candidates = aux_zipf_capacities(usage, budget, n_tokens, k_aux, **variant)
    free = ~active & (capacities > 0).to(pre.device)[None, :]
    scores = torch.where(free, pre.detach(), torch.zeros((), dtype=pre.dtype, device=pre.device))
    # scores: pre (checked finite by the SAE) or 0, so the unchecked call (no second pass over (n, F))
    return scope.allocate(scores, Constraints(per_feature=capacities.cpu())), min(n_candidates / k_aux, 1.0)


def aux_zipf_loss(
    pre: Tensor,
    active: Tensor,
    residual: Tensor,
    W_dec: Tensor,
    usage: Tensor,
    budget: float,
    *,
    s: float = 1.0,
    k_aux: Optional[int] = None,
    coefficient: float = ALPHA_AUX,
    reduction: str = "mean",
    cap: Optional[float] = 1.0,
    sparse: bool = True,
    deficit: str = DEFAULT_DEFICIT,
    fit: bool = False,
    exclude_saturated: bool = False,
    fill: bool = True,
    under_used_only: bool = DEFAULT_UNDER_USED_ONLY,
    scope: BatchScope = LOCAL,
) -> Tensor:
    """Auxiliary loss towards Zipf-shaped feature usage (dead AND under-used features).

        t = zipf_targets(usage, budget, s)      t_j = c / r_j^s, sum_j t_j = budget (fit: c, s fitted)
        d_j = (1 - u_j / t_j)+ if u_j < 0.1 budget / F else 0     (default: relative, under_used_only)
        D = {j : d_j > 0},  m_j = min(c' d_j, n) summing to min(k_aux, |D|) n   (water-filled, integers)
        M_aux = FeatureChoice(m) on pre restricted to entries not already ``active``
        loss = alpha min(|D| / k_aux, 1) R(||e_hat - e||^2) / R(||e - mean e||^2)

    Other deficits: absolute (t - u)+ (the default before 0.2, with under_used_only=False) and
    log_ratio (-log(u/t + eps))+.
    with e = residual (detached), e_hat = (pre * M_aux) @ W_dec (no b_dec), R the main loss's
    reduction. pre: (n, F); active: (n, F) bool, the main allocation; usage: (F,) recent firing
    frequency (activations per token); budget: activations per token (k for TopK(k)); k_aux
    defaults to d // 2. ``deficit`` (see ``deficits``), ``fit`` (targets from the law fitted to the
    usage above UNDER_USED_FACTOR budget / F, ``fitted_zipf_targets``), ``exclude_saturated`` (no
    deficit where the target sits at ``cap``), ``under_used_only`` (no deficit at or above the
    under-used threshold) and ``fill`` (False: the clamped capacities of configs before 0.2) choose
    the variant; benchmarks/aux_variants.py measures them. With usage 0 except some saturated
    features and |D| <= k_aux every variant is exactly ``aux_k_loss`` on the dead ones.
    """
    k_aux = _check_k_aux(k_aux, residual.shape[-1])
    mask, scale = aux_zipf_selection(
        pre, active, usage, budget, k_aux, s=s, cap=cap, deficit=deficit, fit=fit, exclude_saturated=exclude_saturated,
        fill=fill, under_used_only=under_used_only, scope=scope,
    )
    if scale == 0.0:
        return pre.new_zeros(())  # no graph: a zero gradient would make the encoder backward dense
    return coefficient * scale * _residual_reconstruction_loss(pre, mask, residual, W_dec, reduction, sparse, scope)
