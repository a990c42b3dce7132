"""The exact LP on a checked float64 score matrix (scipy/HiGHS, cvxpy, milp): mask, objective, prices.

``allocation.solve`` validates its input and dispatches here (or to the torch auction); the torch
auction's fallback calls ``solve_lp`` directly, so neither solver imports the other's dispatcher.
"""

from __future__ import annotations

import time

import numpy as np

from ..constraints import Constraints
from ..errors import SolverError
from .lp import build_lp
from .result import Allocation

INTEGRALITY_TOLERANCE = 1e-6


def solve_lp(scores: np.ndarray, constraints: Constraints, backend: str = "scipy") -> Allocation:
    """Exact max <S, M> within ``constraints`` by an LP backend ('scipy', 'cvxpy', 'milp'); S finite float64."""
    caps = constraints.resolve(*scores.shape)
    start = time.perf_counter()
    # Solve on S / max(S): HiGHS' optimality tolerances are absolute (~1e-7), so unscaled tiny
    # positive scores would be treated as zero (or break the solve); prices scale back by max(S).
    largest = float(scores.max())
    scale = largest if largest > 0 else 1.0
    mask, prices = _solve_scaled(scores / scale, caps, backend)
    seconds = time.perf_counter() - start
    mask &= scores > 0
    objective = float(scores[mask].sum())
    token_prices, feature_prices, budget_price = (None if p is None else p * scale for p in prices)
    return Allocation(mask, objective, token_prices, feature_prices, budget_price, backend, seconds)


def _solve_scaled(scores: np.ndarray, caps, backend: str):
    """The 0/1 mask and prices of the LP on scores whose largest entry is 1 (or none positive)."""
    if not np.any(scores > 0):
        return np.zeros(scores.shape, dtype=bool), _zero_prices(caps)
    if backend == "cvxpy":
        from .cvxpy_backend import solve_cvxpy

        matrix, prices = solve_cvxpy(scores, caps)
        return _round(matrix, backend), prices
    from .scipy_backend import solve_linprog, solve_milp

    lp = build_lp(scores, caps)
    x, prices = (solve_linprog if backend == "scipy" else solve_milp)(lp)
    mask = np.zeros(scores.shape, dtype=bool)
    mask[lp.rows, lp.cols] = _round(x, backend)
    return mask, prices


def _round(x: np.ndarray, backend: str) -> np.ndarray:
    """Round an LP vertex to 0/1, raising if it is not integral (it must be: the LP is TU)."""
    x = np.asarray(x, dtype=np.float64)
    rounded = np.round(x)
    gap = float(np.max(np.abs(x - rounded), initial=0.0))
    if gap > INTEGRALITY_TOLERANCE:
        raise SolverError(
            f"{backend} returned a non-integral solution (max distance to 0/1 = {gap:.3g}); "
            "the allocation LP is totally unimodular, so this is a solver failure"
        )
    return rounded > 0.5


def _zero_prices(caps):
    """Prices when no score is positive: every cap is slack, so every price is 0."""
    token = np.zeros(caps.n_tokens) if caps.per_token is not None else None
    feature = np.zeros(caps.n_features) if caps.per_feature is not None else None
    budget = 0.0 if caps.total is not None else None
    return token, feature, budget
