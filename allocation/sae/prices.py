"""Dual prices of a batch allocation: the thresholds a batch rule's mask obeys.

A batch rule keeps entry (i, j) iff pre_ij is above its slice's price: one global price for a
budget (Mutual Choice), one price per feature for feature caps (Feature Choice). Any value between
the smallest kept and the largest dropped score of the slice is an optimal dual; we take the
midpoint (the dropped side clipped at 0: only positive scores are kept), and 0 where the cap is slack.
The passes over the (n, F) matrix run in row chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._masks import count_selected

ROWS_PER_CHUNK = 256
"""Row chunk of the threshold passes: small temporaries the allocator reuses, instead of fresh (n, F)
tensors each step (page faults on CPU, and two more (n, F) tensors at the step's peak memory)."""


def largest_dropped_per_column(pre: Tensor, mask: Tensor) -> Tensor:
    """max {pre_ij : not mask_ij} over rows i, per column j (-inf where every entry is kept)."""
    largest = pre.new_full((pre.shape[1],), float("-inf"))
    for start in range(0, pre.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        torch.maximum(largest, torch.where(mask[rows], float("-inf"), pre[rows]).amax(dim=0), out=largest)
    return largest


def budget_price(pre: Tensor, mask: Tensor, kept_values: Tensor, budget: int) -> Tensor:
    """Scalar price of a total budget: midpoint of the smallest kept and largest dropped score (0 if slack)."""
    if kept_values.numel() == 0 or kept_values.numel() < budget:
        return pre.new_zeros(())
    return (kept_values.min() + largest_dropped_per_column(pre, mask).max().clamp_min(0)) / 2


def feature_prices(pre: Tensor, mask: Tensor, feature_index: Tensor, kept_values: Tensor, capacity) -> Tensor:
    """(F,) prices of per-feature caps ``capacity`` (int or (F,)): midpoints, 0 where a cap is slack."""
    n_features = pre.shape[1]
    if isinstance(capacity, Tensor):
        capacity = capacity.to(pre.device)
    kept = torch.bincount(feature_index, minlength=n_features)
    smallest_kept = pre.new_full((n_features,), float("inf")).scatter_reduce_(
        0, feature_index, kept_values, "amin"
    )
    price = (smallest_kept + largest_dropped_per_column(pre, mask).clamp_min(0)) / 2
    tight = (kept >= capacity) & (kept > 0)
    return torch.where(tight, price, torch.zeros_like(price))


def count_above_per_column(pre: Tensor, threshold: Tensor) -> Tensor:
    """#{i : pre_ij > threshold_j} per column j, as float64 (threshold: (F,) or a scalar)."""
    counts = torch.zeros(pre.shape[1], dtype=torch.int64, device=pre.device)
    for start in range(0, pre.shape[0], ROWS_PER_CHUNK):
        counts += count_selected(pre[start : start + ROWS_PER_CHUNK] > threshold, dim=0)
    return counts.to(torch.float64)
