"""Optimality certificate for a mask and prices: LP duality checked entry by entry, in float64.

For prices a, b, lambda >= 0 the dual objective
    D = sum_i k_i a_i + sum_j m_j b_j + B lambda + sum_ij max(0, S_ij - a_i - b_j - lambda)
bounds every feasible mask's objective from above (weak duality), so D - P >= 0 bounds how far the
mask's objective P is from the optimum. The gap is exactly the sum of the complementary-slackness
violations: selected entries below their threshold a_i + b_j + lambda, unselected positive entries
above it, and slack caps with a positive price. The certificate holds when the mask is feasible,
each violation is within ``entry_tolerance`` (so the mask is exactly optimal for scores within that
distance of S), no slack cap has a positive price, and D - P <= ``gap_tolerance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Certificate:
    """The outcome of ``check_certificate``; ``ok`` is True only if every check passed."""

    ok: bool
    primal: float  # sum of the selected scores
    dual: float  # the dual objective D at the prices
    gap: float  # D - P, an upper bound on the mask's distance to the optimum
    gap_tolerance: float
    entry_tolerance: float
    selected_violation: float  # max over selected of a_i + b_j + lambda - S_ij (0 if none)
    unselected_violation: float  # max over unselected positive of S_ij - a_i - b_j - lambda
    failures: tuple  # names of the checks that failed (empty when ok)

    def __str__(self) -> str:
        verdict = "holds" if self.ok else f"FAILS ({', '.join(self.failures)})"
        return (
            f"certificate {verdict}: primal {self.primal:.10g}, dual {self.dual:.10g}, "
            f"gap {self.gap:.3g} <= {self.gap_tolerance:.3g}; slackness violations "
            f"selected {self.selected_violation:.3g}, unselected {self.unselected_violation:.3g} "
            f"(tolerance {self.entry_tolerance:.3g})"
        )


def check_certificate(
    scores: Tensor,  # (n, F) float64
    mask: Tensor,  # (n, F) bool
    token_caps: Tensor,  # (n,) int64
    feature_caps: Tensor,  # (F,) int64
    budget: Optional[int],
    token_prices: Tensor,  # (n,) float64
    feature_prices: Tensor,  # (F,) float64
    budget_price: float,
    entry_tolerance: float,
    gap_tolerance: float,
) -> Certificate:
    """Check feasibility, complementary slackness and the duality gap of (mask, a, b, lambda)."""
    failures = []
    rows, cols = mask.sum(dim=1), mask.sum(dim=0)
    total = int(rows.sum())
    selected_scores = scores[mask]
    if bool((selected_scores <= 0).any()):
        failures.append("selects a non-positive score")
    if bool((rows > token_caps).any()):
        failures.append("per-token cap exceeded")
    if bool((cols > feature_caps).any()):
        failures.append("per-feature cap exceeded")
    if budget is not None and total > budget:
        failures.append("budget exceeded")
    if bool((token_prices < 0).any()) or bool((feature_prices < 0).any()) or budget_price < 0:
        failures.append("negative price")
    if not (bool(torch.isfinite(token_prices).all()) and bool(torch.isfinite(feature_prices).all())
            and budget_price < float("inf")):
        failures.append("infinite price")
    if bool(((token_prices > 0) & (rows < token_caps)).any()):
        failures.append("priced token below its cap")
    if bool(((feature_prices > 0) & (cols < feature_caps)).any()):
        failures.append("priced feature below its cap")
    if budget_price > 0 and (budget is None or total < budget):
        failures.append("priced budget not used up")

    # reduced scores r_ij = S_ij - a_i - b_j - lambda; r <= 0 wherever S <= 0 (prices are >= 0)
    reduced = scores - token_prices[:, None]
    reduced -= feature_prices[None, :]
    reduced -= budget_price
    selected_reduced = reduced[mask]
    selected_violation = max(float(-selected_reduced.min()), 0.0) if selected_reduced.numel() else 0.0
    positive_part = reduced.clamp_(min=0.0)  # in place: the matrix is not needed any more
    positive_part_sum = float(positive_part.sum())
    unselected_violation = float(positive_part.masked_fill_(mask, 0.0).max())
    if selected_violation > entry_tolerance:
        failures.append("selected entry below its threshold")
    if unselected_violation > entry_tolerance:
        failures.append("unselected positive entry above its threshold")

    primal = float(selected_scores.sum())
    budget_term = budget * budget_price if budget is not None and budget_price > 0 else 0.0
    dual = float(
        (token_caps.to(torch.float64) * token_prices).sum()
        + (feature_caps.to(torch.float64) * feature_prices).sum()
    ) + positive_part_sum + budget_term
    gap = dual - primal
    if not gap <= gap_tolerance:
        failures.append("duality gap too large")
    return Certificate(
        ok=not failures,
        primal=primal,
        dual=dual,
        gap=gap,
        gap_tolerance=gap_tolerance,
        entry_tolerance=entry_tolerance,
        selected_violation=selected_violation,
        unselected_violation=unselected_violation,
        failures=tuple(failures),
    )
