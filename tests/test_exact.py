"""Exact solvers: the LP optimum is 0/1, backends agree, duals certify optimality, bad input fails."""

import numpy as np
import pytest
import torch
from allocation_strategies import assert_feasible, problems, tolerance
from hypothesis import given, settings

from allocation import AllocationError, Constraints, SolverError, solve
from allocation.exact import solve as exact_solve_module  # noqa: F401  (the package path is public)
from allocation.exact.solve import _round

COUNTEREXAMPLE = np.array([[10.0, 9.0], [9.0, 0.0]])


@pytest.mark.parametrize("backend", ["scipy", "cvxpy", "milp"])
def test_documented_counterexample_exact_is_18(backend):
    allocation = solve(COUNTEREXAMPLE, Constraints(per_token=1, per_feature=1), backend=backend)
    assert allocation.objective == 18.0
    assert allocation.mask.tolist() == [[False, True], [True, False]]


def test_documented_counterexample_greedy_is_10():
    """Global greedy under row and column caps: takes 10, which blocks both 9s."""
    order = np.argsort(-COUNTEREXAMPLE, axis=None)
    rows_used, cols_used, total = set(), set(), 0.0
    for flat in order:
        i, j = divmod(int(flat), 2)
        if COUNTEREXAMPLE[i, j] > 0 and i not in rows_used and j not in cols_used:
            rows_used.add(i), cols_used.add(j)
            total += COUNTEREXAMPLE[i, j]
    assert total == 10.0


@given(problems())
def test_scipy_lp_is_integral_feasible_and_matches_milp(problem):
    scores, constraints = problem
    lp = solve(scores, constraints, backend="scipy")  # raises SolverError if the vertex is fractional
    assert_feasible(lp.mask, scores, constraints)
    integer = solve(scores, constraints, backend="milp")
    assert abs(lp.objective - integer.objective) <= tolerance(scores)


@settings(max_examples=30)
@given(problems())
def test_cvxpy_and_scipy_agree(problem):
    scores, constraints = problem
    by_scipy = solve(scores, constraints, backend="scipy")
    by_cvxpy = solve(scores, constraints, backend="cvxpy")
    assert_feasible(by_cvxpy.mask, scores, constraints)
    assert abs(by_scipy.objective - by_cvxpy.objective) <= tolerance(scores)


def _check_certificate(scores, constraints, allocation, slack=1e-7):
    """Complementary slackness and a zero duality gap: the prices prove the mask optimal."""
    caps = constraints.resolve(*scores.shape)
    threshold = allocation.threshold()
    positive, mask = scores > 0, allocation.mask
    scale = 1.0 + np.abs(scores).max()
    assert np.all(scores[mask] >= threshold[mask] - slack * scale)
    assert np.all(scores[positive & ~mask] <= threshold[positive & ~mask] + slack * scale)
    dual = float(np.maximum(scores - threshold, 0.0)[positive].sum())
    for prices, cap in ((allocation.token_prices, caps.per_token), (allocation.feature_prices, caps.per_feature)):
        if prices is not None:
            assert np.all(prices >= 0)
            dual += float(prices @ cap)
    if allocation.budget_price is not None:
        assert allocation.budget_price >= 0
        dual += allocation.budget_price * caps.total
    assert abs(dual - allocation.objective) <= 1e-6 * (1.0 + np.abs(scores).sum())


@pytest.mark.parametrize("backend", ["scipy", "cvxpy"])
@settings(max_examples=30)
@given(problem=problems())
def test_duals_certify_optimality(backend, problem):
    scores, constraints = problem
    allocation = solve(scores, constraints, backend=backend)
    _check_certificate(scores, constraints, allocation)


@settings(max_examples=40)
@given(problems(kinds=("mutual_choice",)))
def test_mutual_choice_price_separates_selected_from_rejected(problem):
    scores, constraints = problem
    allocation = solve(scores, constraints)
    price, eps = allocation.budget_price, 1e-7 * (1 + np.abs(scores).max())
    assert np.all(scores[allocation.mask] >= price - eps)
    assert np.all(scores[(scores > 0) & ~allocation.mask] <= price + eps)


@settings(max_examples=40)
@given(problems(kinds=("topk", "feature_choice")))
def test_row_and_column_prices_separate_per_slice(problem):
    scores, constraints = problem
    allocation = solve(scores, constraints)
    if constraints.kind == "topk":
        prices, oriented, mask = allocation.token_prices, scores, allocation.mask
    else:
        prices, oriented, mask = allocation.feature_prices, scores.T, allocation.mask.T
    eps = 1e-7 * (1 + np.abs(scores).max())
    for price, row, kept in zip(prices, oriented, mask):
        assert np.all(row[kept] >= price - eps)
        assert np.all(row[(row > 0) & ~kept] <= price + eps)


def test_mixed_caps_with_budget_on_a_medium_matrix():
    scores = np.random.default_rng(1).standard_normal((40, 90))
    constraints = Constraints(per_token=5, per_feature=3, total=150)
    by_scipy, by_cvxpy = solve(scores, constraints), solve(scores, constraints, backend="cvxpy")
    assert by_scipy.mask.sum() == 150
    assert by_scipy.objective == pytest.approx(by_cvxpy.objective, rel=1e-9)
    _check_certificate(scores, constraints, by_scipy)


def test_accepts_torch_input_and_reports_time_and_backend():
    allocation = solve(torch.tensor(COUNTEREXAMPLE), Constraints.topk(1))
    assert allocation.objective == 19.0 and allocation.backend == "scipy" and allocation.seconds >= 0
    assert allocation.token_prices.shape == (2,) and allocation.feature_prices is None
    assert allocation.budget_price is None


def test_nothing_positive_selects_nothing_with_zero_prices():
    allocation = solve(-np.ones((3, 4)), Constraints(per_token=2, per_feature=1, total=3))
    assert not allocation.mask.any() and allocation.objective == 0.0
    assert allocation.budget_price == 0.0 and not allocation.token_prices.any()


def test_non_integral_vertex_is_rejected():
    with pytest.raises(SolverError, match="non-integral"):
        _round(np.array([0.0, 0.5, 1.0]), "scipy")


def test_failed_solve_raises_solver_error(monkeypatch):
    import allocation.exact.scipy_backend as scipy_backend

    class Failed:
        status, message = 4, "numerical difficulties"

    monkeypatch.setattr(scipy_backend, "linprog", lambda *a, **k: Failed())
    with pytest.raises(SolverError, match="numerical difficulties"):
        solve(COUNTEREXAMPLE, Constraints.topk(1))


@pytest.mark.parametrize(
    "scores, message",
    [
        (np.array([[1.0, np.nan]]), "NaN or inf"),
        (np.array([[1.0, np.inf]]), "NaN or inf"),
        (np.ones(3), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.ones((0, 3)), "empty"),
        (np.array([["a", "b"]]), "real numeric"),
    ],
)
def test_bad_scores_raise(scores, message):
    with pytest.raises(AllocationError, match=message):
        solve(scores, Constraints.topk(1))


def test_bad_backend_and_constraints_raise():
    with pytest.raises(AllocationError, match="backend must be one of"):
        solve(COUNTEREXAMPLE, Constraints.topk(1), backend="gurobi")
    with pytest.raises(AllocationError, match="constraints must be an allocation.Constraints"):
        solve(COUNTEREXAMPLE, {"per_token": 1})
    with pytest.raises(AllocationError, match="per_token has length 3"):
        solve(COUNTEREXAMPLE, Constraints.topk([1, 1, 1]))


@pytest.mark.parametrize("backend", ["scipy", "cvxpy", "milp"])
@pytest.mark.parametrize("tiny", [1e-9, 7e-195])
def test_tiny_positive_scores_are_still_selected(backend, tiny):
    """HiGHS' tolerances are absolute; solving on S / max(S) keeps tiny positives worth taking."""
    scores = np.array([[0.0, tiny]])
    allocation = solve(scores, Constraints(per_token=1, per_feature=1), backend=backend)
    assert allocation.objective == tiny and allocation.mask.tolist() == [[False, True]]


def test_prices_scale_with_the_scores():
    scores = np.random.default_rng(3).standard_normal((6, 9))
    constraints = Constraints(per_token=2, per_feature=1, total=7)
    base, scaled = solve(scores, constraints), solve(1e6 * scores, constraints)
    assert np.array_equal(base.mask, scaled.mask)
    _check_certificate(1e6 * scores, constraints, scaled)


HUGE_CAPS = [
    Constraints.topk(2**63),
    Constraints.feature_choice(2**63),
    Constraints(per_token=2**63, per_feature=10**30),
    Constraints(per_token=2, per_feature=2**64, total=10**20),
    Constraints.mutual_choice(10**20),
    Constraints.topk(np.full(5, 2**64 - 1, dtype=np.uint64)),
    Constraints.feature_choice(np.full(7, 1e30)),
]


@pytest.mark.parametrize("constraints", HUGE_CAPS, ids=repr)
def test_issue11_huge_caps_mean_no_cap_in_every_backend(constraints):
    """Issue 11.6: topk(2**63) raised OverflowError everywhere (allocate too); mutual_choice(10**20)
    was a HiGHS 'Status 4' SolverError while the other backends returned the optimum."""
    from allocation.rules import allocate

    scores = np.random.default_rng(11).standard_normal((5, 7))
    finite = constraints.resolve(5, 7)  # the same constraint set with caps the matrix can use
    assert finite.total is None or finite.total <= 35
    expected = solve(scores, Constraints(finite.per_token, finite.per_feature, finite.total)).objective
    for backend in ("scipy", "cvxpy", "milp", "torch"):
        assert solve(scores, constraints, backend=backend).objective == pytest.approx(expected, abs=1e-9)
    if constraints.greedy_exact:
        mask = allocate(torch.from_numpy(scores), constraints).numpy()
        assert float(scores[mask].sum()) == pytest.approx(expected, abs=1e-9)


def test_issue11_complex_torch_scores_are_refused_like_complex_numpy():
    """Issue 11.7: a complex tensor was solved on its real part (only torch's cast warning)."""
    for scores in (torch.ones(2, 3, dtype=torch.complex64), np.ones((2, 3), dtype=complex)):
        with pytest.raises(AllocationError, match="real numeric matrix"):
            solve(scores, Constraints.topk(1))
