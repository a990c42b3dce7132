"""Dual prices of a batch allocation: the thresholds a batch rule's mask obeys.

A batch rule keeps entry (i, j) iff pre_ij is above its slice's price: one global price for a
budget (Mutual Choice), one price per feature for feature caps (Feature Choice). Any value between
the smallest kept and the largest dropped score of the slice is an optimal dual; we take the
midpoint (the dropped side clipped at 0: only positive scores are kept), and 0 where the cap is slack.

The passes over the (n, F) matrix run in row chunks. The blocked Feature and Mutual Choice selections
hand over the candidates they chose from (``allocation._selection.ColumnFrontier``: every entry of a
column down to a floor just below the largest dropped score), which replaces the largest-dropped
pass and the count of most columns.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._masks import count_selected
from .._selection import ColumnFrontier
from .distributed import LOCAL, BatchScope

ROWS_PER_CHUNK = 256
"""Row chunk of the threshold passes: small temporaries the allocator reuses, instead of fresh (n, F)
tensors each step (page faults on CPU, and two more (n, F) tensors at the step's peak memory)."""

REREAD_COLUMNS_MAX = 0.5
"""``count_above_per_column`` reads the columns a frontier cannot count (typically a third: thresholds
below this batch's (m_j + 1)-th score) out of the matrix when they are at most this share of them,
else makes one pass over the whole matrix."""


def largest_dropped_per_column(pre: Tensor, mask: Tensor) -> Tensor:
    """max {pre_ij : not mask_ij} over rows i, per column j (-inf where every entry is kept)."""
    largest = pre.new_full((pre.shape[1],), float("-inf"))
    for start in range(0, pre.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        torch.maximum(largest, torch.where(mask[rows], float("-inf"), pre[rows]).amax(dim=0), out=largest)
    return largest


def budget_price(pre: Tensor, mask: Tensor, kept_values: Tensor, budget: int, scope: BatchScope = LOCAL,
                 frontier: Optional[ColumnFrontier] = None) -> Tensor:
    """Scalar price of a total budget: midpoint of the smallest kept and largest dropped score (0 if slack).

    ``scope``: the batch the budget is over (the smallest, largest and count reduced over its ranks).
    ``frontier``: the selection's of ``mask``, which holds the largest dropped score (clipped at 0).
    """
    n_kept = int(scope.sum(torch.tensor(kept_values.numel(), device=pre.device)))
    if n_kept == 0 or n_kept < budget:
        return pre.new_zeros(())
    smallest = scope.min(_smallest(kept_values, pre))
    if frontier is not None:
        dropped = frontier.largest_unchosen().max()
    else:
        dropped = largest_dropped_per_column(pre, mask).max() if pre.shape[0] else _minus_inf(pre)
    largest_dropped = scope.max(dropped)
    return (smallest + largest_dropped.clamp_min(0)) / 2


def _smallest(values: Tensor, like: Tensor) -> Tensor:
    return values.min() if values.numel() else like.new_tensor(float("inf"))


def _minus_inf(like: Tensor) -> Tensor:
    return like.new_tensor(float("-inf"))


def feature_prices(pre: Tensor, mask: Tensor, feature_index: Tensor, kept_values: Tensor, capacity,
                   budget: Optional[int] = None, scope: BatchScope = LOCAL,
                   frontier: Optional[ColumnFrontier] = None) -> Tensor:
    """(F,) prices of per-feature caps ``capacity`` (int or (F,)): midpoints, 0 where a cap is slack.

    A zero capacity is always tight: its column keeps nothing and is priced at its largest score
    (clipped at 0), so that eval-mode ``pre > price`` keeps nothing of it either (it was priced 0 before
    issue 12, which let a Zipf tail feature with m_j = 0 fire on every positive score at eval).

    With a ``budget`` that the mask uses up, every column is priced (its cap or the budget binds); a
    column that kept nothing then gets the smallest kept score overall, which is above each of its
    entries (none beat the budget's price). ``scope``: counts, smallest and largest reduced over its ranks.
    ``frontier``: the selection's of ``mask`` (``allocation._selection.ColumnFrontier``), which holds
    the largest dropped scores (clipped at 0) without a pass over ``pre``.
    """
    n_features = pre.shape[1]
    if isinstance(capacity, Tensor):
        capacity = capacity.to(pre.device)
    kept = scope.sum(torch.bincount(feature_index, minlength=n_features))
    smallest_kept = scope.min(pre.new_full((n_features,), float("inf")).scatter_reduce_(
        0, feature_index, kept_values, "amin"
    ))
    dropped = largest_dropped_per_column(pre, mask) if frontier is None else frontier.largest_unchosen()
    largest_dropped = scope.max(dropped).clamp_min(0)
    price = (smallest_kept + largest_dropped) / 2
    tight = (kept >= capacity) & (kept > 0)
    n_kept = int(kept.sum())
    if budget is not None and n_kept >= budget > 0:
        price = torch.where(kept > 0, price, smallest_kept.min())
        tight = torch.ones_like(tight)
    closed = torch.as_tensor(capacity, device=pre.device) == 0
    if bool(closed.any()):  # a zero capacity is always tight: its price is its largest (dropped) score
        price = torch.where(closed, largest_dropped, price)
        tight = tight | closed
    return torch.where(tight, price, torch.zeros_like(price))


def count_above_per_column(pre: Tensor, threshold: Tensor, frontier: Optional[ColumnFrontier] = None) -> Tensor:
    """#{i : pre_ij > threshold_j} per column j, as float64 (threshold: (F,) or a scalar).

    ``frontier``: a selection's of ``pre``; the columns whose threshold is at or above its floor are
    counted among its entries, and only the others (when at most REREAD_COLUMNS_MAX of them) are
    read from ``pre``.
    """
    if frontier is not None and threshold.dim() == 1:
        counts, exact = frontier.count_above(threshold)
        rest = (~exact).nonzero().squeeze(1)
        if rest.numel() <= REREAD_COLUMNS_MAX * pre.shape[1]:
            if rest.numel():
                counts[rest] = _count_above(pre, threshold[rest], rest)
            return counts
    return _count_above(pre, threshold)


def _count_above(pre: Tensor, threshold: Tensor, columns: Optional[Tensor] = None) -> Tensor:
    """#{i : pre_ij > threshold_j} for the ``columns`` given (all by default), in row chunks."""
    counts = torch.zeros(pre.shape[1] if columns is None else columns.numel(), dtype=torch.int64, device=pre.device)
    for start in range(0, pre.shape[0], ROWS_PER_CHUNK):
        rows = pre[start : start + ROWS_PER_CHUNK]
        counts += count_selected((rows if columns is None else rows.index_select(1, columns)) > threshold, dim=0)
    return counts.to(torch.float64)
