"""The allocation LP written the way a textbook writes it, solved by cvxpy."""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from ..constraints import ResolvedCaps
from ..errors import SolverError

# HiGHS' presolve is pathological on the dense budget row (docs/design.md, section 4): with a budget,
# presolve off and interior point + crossover (a vertex). Measured at 256 x 1024 with the budget:
# defaults did not finish in 200 s, these options took 18 s.
QUIET = {"output_flag": False}
BUDGET_HIGHS_OPTIONS = {**QUIET, "presolve": "off", "solver": "ipm", "run_crossover": "on"}


def solve_cvxpy(scores: np.ndarray, caps: ResolvedCaps):
    """max <S, M>  s.t.  0 <= M <= [S > 0],  M 1 <= k,  M^T 1 <= m,  1^T M 1 <= B.

    Solved with HiGHS through cvxpy, which returns a vertex (0/1 by total unimodularity). The
    problem is built per call: a DPP Parameter of shape (n, F) does not scale (docs/design.md, section 4).
    Returns (M as an (n, F) float array, (token_prices, feature_prices, budget_price)).
    """
    M = cp.Variable(scores.shape)
    allowed = (scores > 0).astype(np.float64)  # non-positive scores are never worth selecting
    constraints = [M >= 0, M <= allowed]
    token_cap = feature_cap = budget = None
    if caps.per_token is not None:
        token_cap = cp.sum(M, axis=1) <= caps.per_token
        constraints.append(token_cap)
    if caps.per_feature is not None:
        feature_cap = cp.sum(M, axis=0) <= caps.per_feature
        constraints.append(feature_cap)
    if caps.total is not None:
        budget = cp.sum(M) <= caps.total
        constraints.append(budget)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(scores, M))), constraints)
    try:
        problem.solve(solver=cp.HIGHS, highs_options=BUDGET_HIGHS_OPTIONS if budget is not None else QUIET)
    except cp.error.SolverError as error:
        raise SolverError(f"cvxpy/HiGHS failed to solve the allocation LP: {error}") from error
    if problem.status != cp.OPTIMAL:
        raise SolverError(f"cvxpy/HiGHS ended with status {problem.status!r}, not optimal")

    def dual(constraint):
        if constraint is None:
            return None
        return np.maximum(np.asarray(constraint.dual_value, dtype=np.float64), 0.0)

    budget_price = dual(budget)
    return M.value, (dual(token_cap), dual(feature_cap), None if budget_price is None else float(budget_price))
