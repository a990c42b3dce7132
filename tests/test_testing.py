"""allocation.testing: the strategies draw what they promise, and assert_optimal is usable in pytest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from allocation import Constraints, solve
from allocation.errors import AllocationError
from allocation.testing import allocation_problems, constraints, score_elements, score_matrices

FIND = settings(max_examples=300, database=None, derandomize=True, phases=(Phase.generate,))  # no shrink
SHRINK = settings(max_examples=300, database=None, derandomize=True)


@settings(max_examples=40)
@given(score_matrices(2, 5, 3, 4))
def test_score_matrices_are_finite_float32_tensors_in_the_shape_range(scores):
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert 2 <= scores.shape[0] <= 5 and 3 <= scores.shape[1] <= 4
    assert bool(torch.isfinite(scores).all())
    nonzero = scores[scores != 0].abs()
    assert nonzero.numel() == 0 or float(nonzero.min()) >= 1e-6 * (1 - 1e-6)


@settings(max_examples=40)
@given(score_matrices(max_tokens=8, max_features=8, dtype=torch.float16))
def test_half_precision_matrices_sum_without_overflow(scores):
    assert scores.dtype == torch.float16
    assert bool(torch.isfinite(scores.abs().sum()))


@pytest.mark.parametrize(
    "description, condition",
    [
        ("a tie between two positive scores", lambda s: _has_positive_tie(s)),
        ("an all non-positive row among several", lambda s: s.shape[0] > 1 and bool((s <= 0).all(dim=1).any())
         and bool((s > 0).any())),
        ("an all non-positive column among several", lambda s: s.shape[1] > 1
         and bool((s <= 0).all(dim=0).any()) and bool((s > 0).any())),
        ("a negative score", lambda s: bool((s < 0).any())),
        ("a dynamic range of 1e6 among positive scores", lambda s: _positive_range(s) >= 1e6),
        ("two identical rows", lambda s: s.shape[0] > 1 and bool((s[0] == s[1]).all())
         and bool((s > 0).any())),
    ],
)
def test_score_matrices_reach_the_hard_cases(description, condition):
    found = find(score_matrices(), condition, settings=FIND)
    assert condition(found), description


def _has_positive_tie(scores):
    positive = scores[scores > 0]
    return positive.numel() > positive.unique().numel()


def _positive_range(scores):
    positive = scores[scores > 0]
    return float(positive.max() / positive.min()) if positive.numel() else 0.0


def test_failing_property_shrinks_to_a_tiny_integer_matrix():
    """What makes counterexamples readable: the strategy shrinks to small shapes and small integers."""
    found = find(score_matrices(), lambda s: bool((s > 0).sum() >= 2), settings=SHRINK)
    assert found.numel() <= 2 and found.tolist() in ([[1.0, 1.0]], [[1.0], [1.0]])


@settings(max_examples=40)
@given(st.data())
def test_constraints_fit_the_shape_and_respect_the_flags(data):
    n_tokens, n_features = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    caps = data.draw(constraints(n_tokens, n_features, per_token=True, per_feature=False))
    assert caps.per_token is not None and caps.per_feature is None
    resolved = caps.resolve(n_tokens, n_features)  # raises if a vector cap had the wrong length
    assert resolved.per_token.shape == (n_tokens,) and (resolved.per_token <= n_features + 1).all()


@settings(max_examples=25)
@given(allocation_problems(max_tokens=4, max_features=4, dtype=torch.float64))
def test_allocation_problems_are_solvable_pairs(problem):
    scores, caps = problem
    assert isinstance(caps, Constraints) and scores.dtype == torch.float64
    result = solve(scores.numpy(), caps)
    assert result.mask.shape == tuple(scores.shape)


def test_bad_strategy_arguments_raise_at_once():
    with pytest.raises(AllocationError, match="min_tokens"):
        score_matrices(min_tokens=3, max_tokens=2)
    with pytest.raises(AllocationError, match="min_features"):
        score_matrices(min_features=0)
    with pytest.raises(AllocationError, match="floating"):
        score_matrices(dtype=torch.int64)
    with pytest.raises(AllocationError, match="regime"):
        score_elements("gaussian")


def test_custom_elements_are_used():
    found = find(score_matrices(elements=st.just(2.5), structure=False), lambda s: True, settings=FIND)
    assert np.all(found.numpy() == 2.5)
