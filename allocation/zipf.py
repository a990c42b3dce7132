"""Zipf-shaped sizes by water-filling: the one place the package turns j^-s into budgets.

    t_j = min(max(c w_j, floor), cap),  w_j = j^-s (non-increasing),  c such that sum_j t_j = total

Used for Feature Choice's Zipf capacities (``allocation.sae.rules``), the usage targets of the Zipf
auxiliary loss (``allocation.sae.losses``) and the benchmark capacities (``allocation.timing``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import AllocationError


def zipf_weights(n: int, s: float, device=None) -> Tensor:
    """w_r = r^-s for ranks r = 1..n (float64)."""
    return torch.arange(1, n + 1, dtype=torch.float64, device=device).pow(-float(s))


def water_fill(weights: Tensor, total: float, cap: Optional[float] = None, floor: float = 0.0) -> Tensor:
    """t_j = min(max(c w_j, floor), cap) summing to ``total`` for non-increasing ``weights`` (float64).

    cap None: no cap. Without a floor: when the first j entries sit at the cap, c = (total - j cap) /
    sum_{r > j} w_r, j the first index where c w_j fits under the cap; ``total >= cap * len`` gives
    every entry the cap. With a floor (> 0, a cap required): ``_water_fill_between``.
    """
    if floor > 0:
        if cap is None:
            raise AllocationError("water_fill with a floor needs a cap")
        return _water_fill_between(weights, total, floor, cap)
    weights = weights.to(torch.float64)
    n = weights.numel()
    if n == 0:
        raise AllocationError("water_fill needs at least one weight")
    if total < 0:
        raise AllocationError(f"total must be >= 0, got {total}")
    if cap is not None and total >= cap * n:
        return torch.full_like(weights, float(cap))
    capped = torch.arange(n, dtype=torch.float64, device=weights.device)
    suffix = weights.flip(0).cumsum(0).flip(0)
    scale = (total - capped * (cap if cap is not None else 0.0)) / suffix
    if cap is None:
        j = 0
    else:
        fits = scale * weights <= cap * (1 + 1e-12)
        j = int(torch.nonzero(fits)[0]) if bool(fits.any()) else n - 1
    filled = scale[j] * weights
    if cap is not None:
        filled[:j] = cap
    return filled


def largest_remainders(real: Tensor, total: int) -> Tensor:
    """Integers floor(x_j), plus one for the largest fractional parts (ties: lowest index), summing to ``total``."""
    base = real.floor()
    extra = int(total - int(base.sum()))
    if extra > 0:
        order = torch.sort(real - base, descending=True, stable=True).indices
        base[order[:extra]] += 1
    return base.to(torch.int64)


def _water_fill_between(weights: Tensor, total: float, floor: float, cap: float) -> Tensor:
    """t_j = min(max(c w_j, floor), cap) summing to ``total`` (float64), floor * len <= total <= cap * len.

    The sum is continuous and non-decreasing in c, so c is found by bisection (to float64 resolution).
    """
    weights = weights.to(torch.float64)
    n = weights.numel()
    if not floor * n <= total <= cap * n:
        raise AllocationError(f"total {total} is outside [floor * n, cap * n] = [{floor * n}, {cap * n}]")
    low, high = 0.0, cap / float(weights.min())
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if float((middle * weights).clamp(floor, cap).sum()) < total:
            low = middle
        else:
            high = middle
    return (high * weights).clamp(floor, cap)


def zipf_capacities(n_tokens: int, n_features: int, budget: int, s: float, floor: int = 0) -> Tensor:
    """Integer capacities m_j ~ j^-s (water-filled under the column size n_tokens) summing to ``budget``.

    ``budget`` must be at most n_tokens * n_features (every column full). ``floor``: no m_j below
    f = min(floor, budget // n_features) (a small batch cannot give every feature more): the Zipf
    shape is water-filled between f and n_tokens, m_j = min(max(c j^-s, f), n_tokens), so only the tail
    that would get less than f is raised to it.
    """
    if not 0 <= budget <= n_tokens * n_features:
        raise AllocationError(f"budget {budget} is outside [0, n_tokens * n_features = {n_tokens * n_features}]")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise AllocationError(f"floor must be an integer >= 0, got {floor!r}")
    least = min(floor, budget // n_features)
    real = water_fill(zipf_weights(n_features, s), float(budget), float(n_tokens), floor=float(least))
    return largest_remainders(real, budget).clamp_(0, n_tokens)
