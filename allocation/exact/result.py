"""The result of an exact solve: the optimal mask, its objective and the LP's dual prices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """An optimal mask with its certificate of optimality.

    Duality: entry (i, j) is selected iff S_ij > token_prices[i] + feature_prices[j] + budget_price
    (up to ties), with a price of 0 for an absent constraint. A price is None when its constraint
    is absent (or, for the ``milp`` cross-check backend, when the solver gives no duals).
    """

    mask: np.ndarray  # (n_tokens, n_features) bool
    objective: float  # sum of the selected scores, in float64
    token_prices: Optional[np.ndarray]  # (n_tokens,) >= 0, dual of M 1 <= k
    feature_prices: Optional[np.ndarray]  # (n_features,) >= 0, dual of M^T 1 <= m
    budget_price: Optional[float]  # >= 0, dual of 1^T M 1 <= B
    backend: str
    seconds: float  # wall time of the solver call (model building included)

    def threshold(self) -> np.ndarray:
        """(n, F) matrix a_i + b_j + lambda that the selected scores beat (absent prices count 0)."""
        n, f = self.mask.shape
        a = self.token_prices if self.token_prices is not None else np.zeros(n)
        b = self.feature_prices if self.feature_prices is not None else np.zeros(f)
        lam = self.budget_price if self.budget_price is not None else 0.0
        return a[:, None] + b[None, :] + lam

    def __repr__(self) -> str:
        return (
            f"Allocation(selected={int(self.mask.sum())} of {self.mask.size}, "
            f"objective={self.objective:.6g}, backend={self.backend!r}, seconds={self.seconds:.3f})"
        )
