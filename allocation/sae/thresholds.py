"""Eval thresholds of batch rules: one estimator, priced from whichever caps a rule's constraints have.

A batch allocation's dual prices are what make its mask batch-independent at inference. Which
prices exist depends only on the caps present (``pricing``):

    "none"     per-token caps only (TopK), or none: no batch dependence, no threshold
    "budget"   a total budget alone (Mutual Choice): one global price, the budget's
    "feature"  per-feature caps, with or without a budget (Feature Choice): one price per feature
    "auction"  per-token caps with a per-feature cap or a budget (Custom): the certified auction's
               prices b_j + lambda (its per-token prices a_i depend on the batch and are not kept)

Eval mode then keeps pre_ij > t_j ("budget", "feature"), or, for "auction", each token's per-token
cap of largest reduced scores pre_ij - t_j > 0: the token's own optimisation problem at the learnt
feature and budget prices (the LP's complementary slackness: S_ij - b_j - lambda > a_i iff kept).

``ThresholdEstimator`` owns the running estimate t = a + c: a, a bias-corrected moving average of
the batch prices; c, a count-matching correction (see ``ThresholdEstimator.update``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._selection import ColumnFrontier
from ..constraints import Constraints
from ..errors import AllocationError
from ..rules import _as_count, allocate_unchecked, select_priced, select_top
from .distributed import LOCAL, BatchScope
from .prices import budget_price, count_above_per_column, feature_prices

ITERATE_AVERAGING = 0.95  # decay of the Polyak average of the threshold-correction iterates
PRICINGS = ("none", "budget", "feature", "auction")


def pricing(constraints: Constraints) -> str:
    """Which dual prices a batch under ``constraints`` has: 'none', 'budget', 'feature' or 'auction'."""
    token, feature, total = (getattr(constraints, cap) is not None for cap in ("per_token", "per_feature", "total"))
    if not feature and not total:
        return "none"
    if token:
        return "auction"
    return "feature" if feature else "budget"


@dataclass(frozen=True)
class Selection:
    """A batch's training mask, with what prices it without another pass over the scores.

    ``prices``: 'auction' pricing's certified eval prices b_j + lambda (F,). ``frontier``: for
    per-feature caps or a budget alone, the candidates the blocked selection chose from (None where
    it did not run).
    """

    mask: Tensor
    prices: Optional[Tensor] = None
    frontier: Optional[ColumnFrontier] = None


def select(pre: Tensor, constraints: Constraints, kind: str, scope: BatchScope = LOCAL,
           reach: Optional[Tensor] = None) -> Selection:
    """The exact training mask (scores already checked finite); the auction returns its prices with it.

    ``scope``: the batch ``constraints`` are for (``allocation.sae.distributed``; this process's rows by default).
    ``reach``: for per-feature caps or a budget alone, the thresholds the count correction will count
    at (``ThresholdEstimator.count_point``), which the frontier then covers where that is cheap.
    """
    if kind == "auction":
        solution, rows = scope.solve_mixed(pre, constraints)
        return Selection(solution.mask if rows is None else rows, solution.feature_prices + solution.budget_price)
    if kind == "feature" and constraints.total is None and not scope.is_global:
        mask, frontier = select_priced(pre, _as_count(constraints.resolve(*pre.shape).per_feature), 0, reach)
        return Selection(mask, frontier=frontier)
    if kind == "budget" and not scope.is_global:
        mask, frontier = select_priced(pre, constraints.resolve(*pre.shape).total, None,
                                       None if reach is None else reach[0])
        return Selection(mask, frontier=frontier)
    return Selection(scope.allocate(pre, constraints))


def eval_select(pre: Tensor, constraints: Constraints, kind: str, thresholds: Tensor) -> Tensor:
    """The batch-independent mask: the rule itself ('none'), pre > t, or per-token top-k of pre - t > 0."""
    if kind == "none":
        return allocate_unchecked(pre, constraints)
    if kind == "auction":
        caps = constraints.resolve(*pre.shape)
        return select_top(pre - thresholds, _as_count(caps.per_token), dim=1)
    return pre > thresholds


def batch_prices(pre: Tensor, mask: Tensor, feature_index: Tensor, kept_values: Tensor,
                 constraints: Constraints, kind: str, auction_prices: Optional[Tensor] = None,
                 scope: BatchScope = LOCAL, frontier: Optional[ColumnFrontier] = None) -> Optional[Tensor]:
    """This batch's dual prices (F,) under ``kind`` pricing, or None ('none').

    'budget': ``budget_price``; 'feature': ``feature_prices`` (with the budget's tightness when there
    is one); 'auction': ``auction_prices`` (solved here by ``solve_mixed`` when not given).
    ``frontier``: ``Selection.frontier`` of ``mask``, when it has one.
    """
    n_features = pre.shape[1]
    if kind == "none":
        return None
    if kind == "budget":
        return budget_price(pre, mask, kept_values, constraints.total, scope, frontier).expand(n_features).clone()
    if kind == "feature":
        return feature_prices(pre, mask, feature_index, kept_values, _raw_capacity(constraints),
                              budget=constraints.total, scope=scope, frontier=frontier)
    if auction_prices is None:
        auction_prices = select(pre, constraints, kind, scope).prices
    return auction_prices.to(device=pre.device, dtype=pre.dtype)


def _raw_capacity(constraints: Constraints) -> Union[int, Tensor]:
    """Per-feature caps as given (not clipped to the batch: a cap above n is slack, its price 0)."""
    cap = constraints.per_feature
    return cap if isinstance(cap, int) else torch.from_numpy(cap.copy())


class ThresholdEstimator(nn.Module):
    """Running eval thresholds t = max(a + c, 0) (F,) of a batch rule, with its four buffers.

    ``sum`` / ``weight``: the bias-corrected exponential moving average a = sum / weight of the batch
    prices (decay ``decay``); ``iterate`` / ``offset``: the count-matching correction and its Polyak
    average c (see ``update``).
    """

    def __init__(self, n_features: int, decay: float = 0.99, correction: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise AllocationError(f"threshold_decay must be in [0, 1), got {decay}")
        if not 0.0 <= correction <= 1.0:
            raise AllocationError(f"threshold_correction must be in [0, 1], got {correction}")
        self.n_features, self.decay, self.correction = n_features, float(decay), float(correction)
        for buffer in ("sum", "offset", "iterate"):
            self.register_buffer(buffer, torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros((), dtype=torch.float64))

    def value(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The thresholds (F,) in ``dtype``: zeros before any update."""
        if float(self.weight) == 0.0:
            return torch.zeros(self.n_features, dtype=dtype, device=device)
        return (self.sum / self.weight + self.offset).clamp_min(0).to(dtype)

    def count_point(self, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        """The thresholds a + c' (F,) at which the next ``update`` counts, or None if it will not count."""
        if not (float(self.weight) > 0.0 and self.correction > 0.0):
            return None
        return (self.sum / self.weight + self.iterate).clamp_min(0).to(device=device, dtype=dtype)

    @torch.no_grad()
    def set(self, thresholds: Tensor) -> None:
        """Replace the running estimate by ``thresholds`` (F,) (e.g. calibrated ones)."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=self.sum.device)
        if thresholds.shape != (self.n_features,) or not bool(torch.isfinite(thresholds).all()):
            raise AllocationError(
                f"thresholds must be {self.n_features} finite numbers, got shape {tuple(thresholds.shape)}"
            )
        self.sum.copy_(thresholds)
        self.weight.fill_(1.0)
        self.offset.zero_()
        self.iterate.zero_()

    @torch.no_grad()
    def update(self, pre: Tensor, price: Tensor, constraints: Constraints, kind: str,
               kept_per_feature: Optional[Tensor] = None, scope: BatchScope = LOCAL,
               frontier: Optional[ColumnFrontier] = None) -> None:
        """Fold this batch's prices (F,) into the running estimate t = a + c (clipped at 0).

        a: bias-corrected exponential moving average of the batch prices (decay ``decay``).
        c: a dual-subgradient correction, iterate c' += eta * a * (count(a + c') - cap) / cap, where
        count is how many of this batch's entries the eval rule keeps at a + c' (scores above it per
        feature for 'feature' pricing, in all for 'budget'; per feature, under the per-token cap,
        for 'auction') and cap what training kept (m_j or the budget B; for 'auction' the training
        mask's column counts ``kept_per_feature`` (F,), required there); c is the moving average of
        the iterates (Polyak averaging, decay ITERATE_AVERAGING = 0.95). An average of per-batch
        order statistics is biased for bursty features (on average fewer than cap scores exceed
        it); the correction drives the expected count at the eval threshold to the training one.
        ``scope``: counts are over its batch, and the four buffers are made the ranks' average where
        each rank priced its own rows. ``frontier``: the training selection's (``Selection.frontier``),
        which holds the 'feature' and 'budget' counts of most columns.
        """
        current = self.count_point(pre.dtype, pre.device)
        if current is not None and kind != "none":
            average = self.sum / self.weight
            if kind == "auction":
                if kept_per_feature is None:
                    raise AllocationError("auction thresholds need kept_per_feature, the training mask's column counts")
                above = scope.sum(eval_select(pre, constraints, kind, current).sum(dim=0).to(torch.float64))
                kept = kept_per_feature.to(device=above.device, dtype=torch.float64)
                # one normaliser for all features and batches: a per-batch kept_j in the denominator
                # would drive E[(count - kept) / kept] to 0 instead of E[count - kept]
                error = (above - kept) / max(float(kept.mean()), 1.0)
            elif kind == "budget":
                above = scope.sum(count_above_per_column(pre, current, frontier).sum())
                capacity = float(constraints.total)
                error = torch.full_like(average, (float(above) - capacity) / max(capacity, 1.0))
            else:
                above = scope.sum(count_above_per_column(pre, current, frontier))
                capacity = _raw_capacity(constraints)
                capacity = (
                    capacity.to(device=pre.device, dtype=torch.float64)
                    if isinstance(capacity, Tensor)
                    else torch.full_like(average, float(capacity))
                )
                error = (above - capacity) / capacity.clamp_min(1.0)
            self.iterate.add_(self.correction * average * error)
            self.iterate.clamp_(min=-average)
            self.offset.mul_(ITERATE_AVERAGING).add_(self.iterate, alpha=1 - ITERATE_AVERAGING)
        self.sum.mul_(self.decay).add_(price.to(torch.float64), alpha=1 - self.decay)
        self.weight.mul_(self.decay).add_(1 - self.decay)
        for buffer in (self.sum, self.offset, self.iterate):
            scope.synchronise_(buffer)


def calibration_constraints(constraints: Constraints, n_tokens: int, n_features: int,
                            target_l0: float) -> Constraints:
    """``constraints`` with their batch-level cap rescaled to a budget of round(target_l0 n_tokens).

    A budget is set to it; otherwise the per-feature caps are rescaled to sum to it (largest
    remainders, shape kept, each at most n_tokens). Per-token caps are kept as they are.
    """
    budget = round(target_l0 * n_tokens)
    if constraints.total is not None:
        return Constraints(per_token=constraints.per_token, per_feature=constraints.per_feature, total=budget)
    if constraints.per_feature is None:
        raise AllocationError(f"{constraints} has no budget or per-feature caps to calibrate")
    return Constraints(per_token=constraints.per_token,
                       per_feature=rescaled_capacities(constraints.per_feature, n_tokens, n_features, budget))


def rescaled_capacities(capacity, n_tokens: int, n_features: int, budget: int) -> Tensor:
    """Per-feature caps (int or (F,)) rescaled to sum to ``budget``: largest remainders, each <= n_tokens.

    A capacity above n_tokens is cut to n_tokens (a column cannot keep more), the one case where the
    sum falls short.
    """
    from ..zipf import largest_remainders

    shape = torch.tensor(np.array(capacity, dtype=np.float64)).expand(n_features).clone()
    total = float(shape.sum())
    if total <= 0:
        raise AllocationError("the rule's capacities are all 0: there is nothing to calibrate")
    return largest_remainders(shape * (budget / total), budget).clamp(0, n_tokens)
