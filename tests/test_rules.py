"""Torch rules reach the exact LP optimum: feasible, same objective as scipy and cvxpy."""

import numpy as np
import pytest
import torch
from allocation_checks import assert_feasible, problems, score_matrices, tolerance
from hypothesis import given, settings
from hypothesis import strategies as st

import allocation
from allocation import AllocationError, Constraints, allocate, solve

LAMINAR = ("topk", "feature_choice", "mutual_choice")


def _named_rule(scores: torch.Tensor, constraints: Constraints) -> torch.Tensor:
    """Call the named rule a user would call for single-family constraints."""
    if constraints.kind == "topk":
        return allocation.topk(scores, constraints.per_token)
    if constraints.kind == "feature_choice":
        return allocation.feature_choice(scores, constraints.per_feature)
    return allocation.mutual_choice(scores, constraints.total)


@st.composite
def laminar_problems(draw):
    """Single families, and the laminar mixes: token caps + budget, feature caps + budget."""
    scores, constraints = draw(problems())
    if not constraints.greedy_exact:
        keep_tokens = draw(st.booleans())
        constraints = Constraints(
            per_token=constraints.per_token if keep_tokens else None,
            per_feature=None if keep_tokens else constraints.per_feature,
            total=constraints.total,
        )
    return scores, constraints


@given(laminar_problems())
def test_allocate_is_feasible_and_optimal(problem):
    scores, constraints = problem
    mask = allocate(torch.from_numpy(scores), constraints).numpy()
    assert_feasible(mask, scores, constraints)
    assert abs(scores[mask].sum() - solve(scores, constraints).objective) <= tolerance(scores)


@settings(max_examples=40)
@given(problems(kinds=LAMINAR))
def test_named_rules_reach_both_exact_backends(problem):
    scores, constraints = problem
    mask = _named_rule(torch.from_numpy(scores).float(), constraints).numpy()
    assert_feasible(mask, scores, constraints)
    objective = scores[mask].sum()
    for backend in ("scipy", "cvxpy"):
        assert abs(objective - solve(scores, constraints, backend=backend).objective) <= tolerance(scores)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@settings(max_examples=25)
@given(problem=problems(kinds=LAMINAR, regime="integers"))
def test_rules_exact_in_every_float_dtype(dtype, problem):
    """Small integers are exact in half precision: heavy ties, and exactly the cap is selected."""
    scores, constraints = problem
    mask = _named_rule(torch.from_numpy(scores).to(dtype), constraints).numpy()
    assert_feasible(mask, scores, constraints)
    assert abs(scores[mask].sum() - solve(scores, constraints).objective) <= tolerance(scores)


@given(score_matrices(), st.integers(0, 10))
def test_exactly_min_of_cap_and_positives_selected(scores, k):
    """Ties never overshoot: each row keeps exactly min(k, #positive) entries."""
    mask = allocation.topk(torch.from_numpy(scores), k).numpy()
    assert np.array_equal(mask.sum(axis=1), np.minimum(k, (scores > 0).sum(axis=1)))
    budget = mask.sum()
    total_mask = allocation.mutual_choice(torch.from_numpy(scores), int(budget)).numpy()
    assert total_mask.sum() == min(budget, (scores > 0).sum())


def test_degenerate_shapes_and_caps():
    scores = torch.tensor([[3.0, -1.0, 2.0]])
    assert allocation.topk(scores, 5).tolist() == [[True, False, True]]  # k >= F
    assert allocation.feature_choice(scores, 0).sum() == 0
    assert allocation.mutual_choice(scores, 0).sum() == 0
    assert allocation.mutual_choice(scores, 100).tolist() == [[True, False, True]]  # budget > positives
    assert allocation.feature_choice(scores.T, 4).tolist() == [[True], [False], [True]]  # m >= n
    assert allocate(scores, Constraints()).tolist() == [[True, False, True]]


def test_per_slice_capacity_vectors():
    scores = torch.tensor([[5.0, 4.0, 3.0], [1.0, 2.0, 6.0]])
    assert allocation.topk(scores, [1, 2]).tolist() == [[True, False, False], [False, True, True]]
    assert allocation.feature_choice(scores, torch.tensor([2, 0, 1])).tolist() == [
        [True, False, False],
        [True, False, True],
    ]


def test_activations_keep_values_and_pass_gradients_to_kept_scores_only():
    scores = torch.tensor([[3.0, 1.0, -2.0], [0.5, 4.0, 2.0]], requires_grad=True)
    values = allocation.topk_activations(scores, 1)
    assert values.tolist() == [[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]
    values.sum().backward()
    assert scores.grad.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    for name in ("feature_choice_activations", "mutual_choice_activations"):
        assert getattr(allocation, name)(scores.detach(), 1).count_nonzero() >= 1
    assert allocation.allocate_activations(scores.detach(), Constraints.mutual_choice(2)).count_nonzero() == 2


def test_mixed_caps_reach_the_optimum_not_greedy():
    """Greedy takes 10 on the documented counterexample; allocate must find 9 + 9 = 18."""
    scores = torch.tensor([[10.0, 9.0], [9.0, 0.0]])
    mask = allocate(scores, Constraints(per_token=1, per_feature=1))
    assert float(scores[mask].sum()) == 18.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: allocation.topk(torch.tensor([[1.0, float("nan")]]), 1), "NaN or inf"),
        (lambda: allocation.mutual_choice(torch.tensor([[float("inf")]]), 1), "NaN or inf"),
        (lambda: allocation.topk(torch.ones(3), 1), "2-D"),
        (lambda: allocation.topk(torch.ones(0, 4), 1), "empty"),
        (lambda: allocation.topk(torch.ones(2, 2, dtype=torch.int64), 1), "floating tensor"),
        (lambda: allocation.topk(np.ones((2, 2)), 1), "torch.Tensor"),
        (lambda: allocation.topk(torch.ones(2, 2), -1), "k must be >= 0"),
        (lambda: allocation.topk(torch.ones(2, 2), [1, 1, 1]), "k has length 3 but scores have 2 tokens"),
        (lambda: allocation.feature_choice(torch.ones(2, 2), 0.5), "m must be an integer"),
        (lambda: allocation.mutual_choice(torch.ones(2, 2), None), "total is required"),
        (lambda: allocate(torch.ones(2, 2), "topk"), "constraints must be an allocation.Constraints"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, message):
    with pytest.raises(AllocationError, match=message):
        call()


@pytest.mark.gpu
def test_rules_on_cuda_match_cpu():
    scores = torch.randn(64, 256)
    for rule, cap in ((allocation.topk, 8), (allocation.feature_choice, 2), (allocation.mutual_choice, 512)):
        cpu = scores[rule(scores, cap)].sum()
        cuda = scores.cuda()[rule(scores.cuda(), cap)].sum().cpu()
        assert torch.allclose(cpu, cuda)
