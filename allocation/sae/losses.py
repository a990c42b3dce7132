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
a Zipf usage target (see ``zipf_targets`` and ``aux_zipf_loss``).

``scope`` (``allocation.sae.distributed``): under data-parallel training each rank's loss is its
share of the global batch's, R over its rows / (the batch's token count for 'mean') / the global
variance; the shares sum to the single-process loss of the whole batch. Default: one process.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._validate import positive_int
from ..constraints import Constraints
from ..errors import AllocationError
from ..rules import allocate_unchecked
from ..zipf import water_fill
from .distributed import LOCAL, BatchScope
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


def zipf_targets(usage: Tensor, budget: float, s: float = 1.0, cap: Optional[float] = 1.0) -> Tensor:
    """Zipf usage targets t_j = c / r_j^s summing to ``budget``, r_j = rank of feature j by usage.

    Rank 1 is the most used feature. Features with equal usage share the mean of their ranks'
    weights (so all-dead features get equal targets). With ``cap`` (usage is a firing frequency,
    which cannot exceed 1) the targets are min(c / r^s, cap) with c chosen so they still sum to
    ``budget`` (water-filling); no cap binds whenever c <= cap.
    """
    usage = usage.detach().to(torch.float64)
    n_features = usage.numel()
    if n_features == 0:
        raise AllocationError("usage is empty")
    if budget < 0:
        raise AllocationError(f"budget must be >= 0, got {budget}")
    order = torch.sort(usage, descending=True, stable=True).indices
    ranks = torch.arange(1, n_features + 1, dtype=torch.float64, device=usage.device)
    weights = ranks.pow(-float(s))
    _, group, counts = torch.unique_consecutive(usage[order], return_inverse=True, return_counts=True)
    group_mean = torch.zeros(counts.numel(), dtype=torch.float64, device=usage.device)
    group_mean.index_add_(0, group, weights)
    weights = (group_mean / counts)[group]  # non-increasing along the rank order
    sorted_targets = water_fill(weights, budget, cap)
    targets = torch.empty_like(sorted_targets)
    targets[order] = sorted_targets
    return targets


def proportional_capacities(weights: Tensor, total: int, limit: int) -> Tensor:
    """Integer capacities ~ total * w_j / sum w (largest remainders), each at most ``limit``."""
    weights = weights.detach().to(torch.float64).clamp_min(0)
    if total <= 0 or float(weights.sum()) == 0.0:
        return torch.zeros(weights.numel(), dtype=torch.int64, device=weights.device)
    raw = total * weights / weights.sum()
    base = raw.floor()
    remainder = int(total - base.sum())
    if remainder > 0:
        fraction = raw - base
        order = torch.sort(fraction, descending=True, stable=True).indices
        base[order[:remainder]] += 1
    return base.to(torch.int64).clamp(max=limit)


def aux_zipf_selection(
    pre: Tensor,
    active: Tensor,
    usage: Tensor,
    budget: float,
    k_aux: int,
    *,
    s: float = 1.0,
    cap: Optional[float] = 1.0,
    scope: BatchScope = LOCAL,
) -> Tuple[Tensor, float]:
    """The auxiliary Feature Choice mask of aux_zipf_loss and its scale min(|D| / k_aux, 1).

    ``scope``: the batch the capacities are sized for and the Feature Choice is over.
    """
    n_features = pre.shape[1]
    n_tokens = scope.n_tokens(pre.shape[0])
    if usage.shape != (n_features,):
        raise AllocationError(f"usage must have shape ({n_features},), got {tuple(usage.shape)}")
    deficit = (zipf_targets(usage, budget, s, cap) - usage.detach().to(torch.float64)).clamp_min(0)
    candidates = deficit > 0
    n_candidates = int(candidates.sum())
    capacities = proportional_capacities(deficit, min(k_aux, n_candidates) * n_tokens, n_tokens)
    free = ~active & candidates.to(pre.device)[None, :]
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
    scope: BatchScope = LOCAL,
) -> Tensor:
    """Auxiliary loss towards Zipf-shaped feature usage (dead AND under-used features).

        t = zipf_targets(usage, budget, s)      t_j = c / r_j^s, sum_j t_j = budget
        deficit_j = max(0, t_j - usage_j),      D = {j : deficit_j > 0}
        m_j = round(min(k_aux, |D|) n deficit_j / sum deficit)   (largest remainders, <= n)
        M_aux = FeatureChoice(m) on pre restricted to entries not already ``active`` and j in D
        loss = alpha min(|D| / k_aux, 1) R(||e_hat - e||^2) / R(||e - mean e||^2)

    with e = residual (detached), e_hat = (pre * M_aux) @ W_dec (no b_dec), R the main loss's
    reduction. pre: (n, F); active: (n, F) bool, the main allocation; usage: (F,) recent firing
    frequency (activations per token); budget: activations per token (k for TopK(k)); k_aux
    defaults to d // 2. With usage 0 except some saturated features and |D| <= k_aux this is exactly
    ``aux_k_loss`` on the dead ones.
    """
    k_aux = _check_k_aux(k_aux, residual.shape[-1])
    mask, scale = aux_zipf_selection(pre, active, usage, budget, k_aux, s=s, cap=cap, scope=scope)
    if scale == 0.0:
        return pre.new_zeros(())  # no graph: a zero gradient would make the encoder backward dense
    return coefficient * scale * _residual_reconstruction_loss(pre, mask, residual, W_dec, reduction, sparse, scope)
