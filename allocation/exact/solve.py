"""``solve(scores, constraints, backend)``: the exact optimum of the allocation LP."""

from __future__ import annotations

from .._validate import check_scores_numpy
from ..constraints import Constraints
from ..errors import AllocationError
from .lp_solve import INTEGRALITY_TOLERANCE, solve_lp
from .result import Allocation

BACKENDS = ("scipy", "cvxpy", "milp", "torch")

__all__ = ["BACKENDS", "INTEGRALITY_TOLERANCE", "solve"]


def solve(scores, constraints: Constraints, backend: str = "scipy") -> Allocation:
    """Exact max <S, M> over 0/1 masks M within ``constraints``; returns mask, objective and prices.

    ``scores`` is an (n, F) numpy array or torch tensor (finite). Backends: ``"scipy"`` (sparse
    HiGHS LP, the default and fastest), ``"cvxpy"`` (the textbook formulation through cvxpy) and
    ``"milp"`` (scipy's integer solver, no prices; small cases only); ``"torch"`` is the certified
    auction of ``allocation.exact_torch`` (CPU here; use ``solve_mixed`` for tensors on a GPU).
    """
    if not isinstance(constraints, Constraints):
        raise AllocationError(
            f"constraints must be an allocation.Constraints, got {type(constraints).__name__}; "
            "build one with Constraints.topk(k), .feature_choice(m) or .mutual_choice(total)"
        )
    if backend not in BACKENDS:
        raise AllocationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scores = check_scores_numpy(scores)
    constraints.resolve(*scores.shape)  # cap lengths checked against S before any backend runs
    if backend == "torch":
        from .torch_backend import solve_as_allocation

        return solve_as_allocation(scores, constraints)
    return solve_lp(scores, constraints, backend)
