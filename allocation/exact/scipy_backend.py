"""The allocation LP solved by scipy's HiGHS (``linprog``), and ``milp`` as a small-case cross-check."""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from ..errors import SolverError
from .lp import LinearProgram, prices_from_duals


def solve_linprog(lp: LinearProgram):
    """Solve max c^T x, A x <= b, 0 <= x <= 1 with HiGHS; return (x, duals of A x <= b).

    Presolve is off: HiGHS' presolve is pathological on the dense budget row (docs/design.md, section 4),
    and the interior-point method with crossover returns a vertex, which is 0/1 here.
    """
    result = linprog(
        -lp.objective,
        A_ub=lp.A if lp.A.shape[0] else None,
        b_ub=lp.b if lp.A.shape[0] else None,
        bounds=(0.0, 1.0),
        method="highs-ipm",
        options={"presolve": False},
    )
    if result.status != 0:
        raise SolverError(f"scipy/HiGHS failed to solve the allocation LP: {result.message}")
    duals = -result.ineqlin.marginals if lp.A.shape[0] else np.zeros(0)
    return result.x, prices_from_duals(lp, duals)


def solve_milp(lp: LinearProgram):
    """Solve the same problem as an integer program (no duals); slow, for cross-checks only."""
    constraints = [LinearConstraint(lp.A, -np.inf, lp.b)] if lp.A.shape[0] else []
    result = milp(
        -lp.objective,
        constraints=constraints,
        integrality=np.ones_like(lp.objective),
        bounds=Bounds(0.0, 1.0),
    )
    if result.status != 0:
        raise SolverError(f"scipy milp failed to solve the allocation problem: {result.message}")
    return result.x, (None, None, None)
