"""Zipf-shaped sizes by water-filling: the one place the package turns j^-s into budgets.

    t_j = min(c w_j, cap),  w_j = j^-s (non-increasing),  c such that sum_j t_j = total

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


def water_fill(weights: Tensor, total: float, cap: Optional[float] = None) -> Tensor:
    """t_j = min(c w_j, cap) summing to ``total`` for non-increasing ``weights`` (float64); cap None: c w_j.

    When the first j entries sit at the cap, c = (total - j cap) / sum_{r > j} w_r; j is the first
    index where c w_j fits under the cap. ``total >= cap * len`` gives every entry the cap.
    """
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


def zipf_capacities(n_tokens: int, n_features: int, budget: int, s: float) -> Tensor:
    """Integer capacities m_j ~ j^-s (water-filled under the column size n_tokens) summing to ``budget``.

    ``budget`` must be at most n_tokens * n_features (every column full).
    """
    if not 0 <= budget <= n_tokens * n_features:
        raise AllocationError(f"budget {budget} is outside [0, n_tokens * n_features = {n_tokens * n_features}]")
    real = water_fill(zipf_weights(n_features, s), float(budget), float(n_tokens))
    return largest_remainders(real, budget).clamp_(0, n_tokens)
