"""The exact torch solver for mixed caps: the LP optimum, a certificate that holds, an honest fallback."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from allocation import AllocationError, Constraints, allocate, solve
from allocation.exact_torch import CertificateWarning, check_certificate, solve_mixed
from allocation.testing import allocation_problems


def reference(scores: torch.Tensor, constraints: Constraints) -> float:
    """The exact optimum from scipy/HiGHS, on exactly the values the torch solver sees."""
    return solve(scores.detach().to("cpu", torch.float64).numpy(), constraints, backend="scipy").objective


def assert_feasible(mask: torch.Tensor, scores: torch.Tensor, constraints: Constraints) -> None:
    caps = constraints.resolve(*scores.shape)
    mask = mask.cpu()
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert not bool((mask & (scores.cpu() <= 0)).any()), "selected a non-positive score"
    if caps.per_token is not None:
        assert (mask.sum(1).numpy() <= caps.per_token).all()
    if caps.per_feature is not None:
        assert (mask.sum(0).numpy() <= caps.per_feature).all()
    if caps.total is not None:
        assert int(mask.sum()) <= caps.total


def assert_matches_lp(scores: torch.Tensor, constraints: Constraints):
    """solve_mixed reaches the LP optimum on the auction path, with a certificate that holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)
        solution = solve_mixed(scores, constraints)
    assert solution.method == "auction"
    assert solution.certificate.ok, str(solution.certificate)
    assert_feasible(solution.mask, scores, constraints)
    values = scores.detach().to("cpu", torch.float64)
    objective = float(values[solution.mask.cpu()].sum())
    assert objective == pytest.approx(solution.objective, abs=1e-9 * (1 + values.abs().sum().item()))
    optimum = reference(scores, constraints)
    allowed = solution.certificate.gap_tolerance + 1e-9 * (1.0 + float(values.abs().sum()))
    assert abs(objective - optimum) <= allowed, (objective, optimum, allowed)
    return solution


def test_counterexample_to_greedy_reaches_18():
    scores = torch.tensor([[10.0, 9.0], [9.0, 0.0]])
    solution = assert_matches_lp(scores, Constraints(per_token=1, per_feature=1))
    assert solution.objective == 18.0
    assert solution.mask.tolist() == [[False, True], [True, False]]
    # the prices separate selected from unselected: 9 >= a_0 + b_1 and 10 <= a_0 + b_0 (up to tol)
    threshold = solution.token_prices[:, None] + solution.feature_prices[None, :] + solution.budget_price
    tol = solution.certificate.entry_tolerance
    assert bool((threshold[solution.mask] <= scores.double()[solution.mask] + tol).all())
    assert bool((threshold[~solution.mask] >= scores.double()[~solution.mask] - tol).all())


def test_allocate_uses_the_exact_solver_for_mixed_caps():
    scores = torch.tensor([[10.0, 9.0], [9.0, 0.0]])
    mask = allocate(scores, Constraints(per_token=1, per_feature=1))
    assert float(scores[mask].sum()) == 18.0


def test_allocate_mixed_caps_random_matches_lp():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(24, 40, generator=generator)
    for total in (None, 60):
        constraints = Constraints(per_token=5, per_feature=2, total=total)
        mask = allocate(scores, constraints)
        assert_feasible(mask, scores, constraints)
        assert float(scores.double()[mask].sum()) == pytest.approx(reference(scores, constraints), rel=1e-9)


@settings(max_examples=80)
@given(allocation_problems(max_tokens=6, max_features=6, per_token=True, per_feature=True))
def test_matches_lp_optimum_on_generated_problems(problem):
    scores, constraints = problem
    assert_matches_lp(scores, constraints)


@settings(max_examples=25)
@given(allocation_problems(max_tokens=12, max_features=12, per_token=True, per_feature=True, total=True,
                           vector_caps=False))
def test_matches_lp_optimum_with_a_budget(problem):
    scores, constraints = problem
    assert_matches_lp(scores, constraints)


@settings(max_examples=20)
@given(st.integers(0, 3), st.integers(1, 4), st.integers(0, 12), st.integers(0, 2**31 - 1))
def test_many_ties_small_integers(per_token, per_feature, total, seed):
    """Integer scores with many exact ties: the classic price-war case for auctions."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-1, 3, (7, 5), generator=generator).float()
    assert_matches_lp(scores, Constraints(per_token=per_token, per_feature=per_feature, total=total))


@pytest.mark.parametrize(
    "scores, constraints",
    [
        ([[3.0, -1.0, 2.0]], Constraints(per_token=2, per_feature=1)),  # n = 1
        ([[3.0], [0.0], [2.0]], Constraints(per_token=1, per_feature=2)),  # F = 1
        ([[1.0, 2.0], [3.0, 4.0]], Constraints(per_token=0, per_feature=1)),  # token caps 0
        ([[1.0, 2.0], [3.0, 4.0]], Constraints(per_token=2, per_feature=[0, 2])),  # a feature cap 0
        ([[1.0, 2.0], [3.0, 4.0]], Constraints(per_token=9, per_feature=9)),  # caps beyond the dims
        ([[1.0, 2.0], [3.0, 4.0]], Constraints(per_token=1, per_feature=1, total=0)),  # budget 0
        ([[1.0, -2.0], [0.0, 4.0]], Constraints(per_token=2, per_feature=2, total=50)),  # budget > positives
        ([[-1.0, -2.0], [0.0, -4.0]], Constraints(per_token=1, per_feature=1, total=1)),  # nothing positive
        ([[5.0, 5.0, 5.0]] * 3, Constraints(per_token=1, per_feature=1)),  # identical rows: a price war
        ([[1e6, 1e-6], [1e-6, 1e6]], Constraints(per_token=1, per_feature=1, total=1)),  # dynamic range
    ],
)
def test_edge_cases(scores, constraints):
    assert_matches_lp(torch.tensor(scores), constraints)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 24, generator=generator).to(dtype)  # many exact ties in half precision
    solution = assert_matches_lp(scores, Constraints(per_token=4, per_feature=3, total=40))
    assert solution.mask.dtype == torch.bool


def test_certificate_refutes_greedy():
    """The check is not vacuous: greedy's mask on the counterexample has no certifying prices."""
    scores = torch.tensor([[10.0, 9.0], [9.0, 0.0]], dtype=torch.float64)
    greedy = torch.tensor([[True, False], [False, False]])
    caps = torch.ones(2, dtype=torch.long)
    # any prices: try the ones that make the greedy choice look best, the gap still shows
    for a, b in [((0.0, 0.0), (0.0, 0.0)), ((1.0, 9.0), (9.0, 0.0)), ((0.0, 9.0), (10.0, 9.0))]:
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        certificate = check_certificate(scores, greedy, caps, caps, None, a, b, 0.0, 1e-9, 1e-9)
        assert not certificate.ok
        assert certificate.gap >= 8.0 - 1e-9  # greedy is 8 below the optimum of 18


def test_fallback_warns_and_stays_exact():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(12, 16, generator=generator)
    constraints = Constraints(per_token=4, per_feature=2, total=30)
    with pytest.warns(CertificateWarning, match="scipy/HiGHS"):
        solution = solve_mixed(scores, constraints, max_rounds=1)
    assert solution.method == "scipy-fallback"
    assert_feasible(solution.mask, scores, constraints)
    assert solution.objective == pytest.approx(reference(scores, constraints), rel=1e-12)
    with pytest.raises(AllocationError, match="could not certify"):
        solve_mixed(scores, constraints, max_rounds=1, fallback=False)


def test_benchmark_shape_matches_lp():
    """A smaller copy of the benchmark setting: caps 8 per token, ceil(2 k n / F) per feature."""
    generator = torch.Generator().manual_seed(2)
    n, f, k = 48, 192, 8
    scores = torch.randn(n, f, generator=generator)
    for total in (None, k * n // 2):
        assert_matches_lp(scores, Constraints(per_token=k, per_feature=math.ceil(2 * k * n / f), total=total))


def test_bad_input_is_reported():
    with pytest.raises(AllocationError, match="constraints"):
        solve_mixed(torch.ones(2, 2), "topk")
    with pytest.raises(AllocationError, match="rtol"):
        solve_mixed(torch.ones(2, 2), Constraints(per_token=1, per_feature=1), rtol=0.0)
    with pytest.raises(AllocationError, match="NaN"):
        solve_mixed(torch.tensor([[float("nan")]]), Constraints(per_token=1, per_feature=1))


@pytest.mark.gpu
def test_cuda_matches_lp():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(64, 256, generator=generator).cuda()
    for total in (None, 512):
        solution = assert_matches_lp(scores, Constraints(per_token=16, per_feature=8, total=total))
        assert solution.mask.device.type == "cuda"
    half = scores.to(torch.bfloat16)
    assert_matches_lp(half, Constraints(per_token=16, per_feature=8, total=512))


def test_solve_backend_torch_returns_prices():
    scores = np.array([[10.0, 9.0], [9.0, 0.0]])
    result = solve(scores, Constraints(per_token=1, per_feature=1), backend="torch")
    assert result.objective == 18.0 and result.backend == "torch"
    assert result.token_prices is not None and result.feature_prices is not None


@settings(max_examples=30)
@given(allocation_problems(max_tokens=6, max_features=6))
def test_backend_torch_agrees_with_scipy_on_any_caps(problem):
    """Laminar caps too (greedy would do, but the auction must still be exact there)."""
    scores, constraints = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)
        result = solve(scores, constraints, backend="torch")
    values = scores.to(torch.float64)
    assert result.objective == pytest.approx(reference(scores, constraints),
                                             abs=1e-9 * (1.0 + float(values.abs().sum())))
