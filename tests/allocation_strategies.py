"""Hypothesis strategies for the foundation's property tests: score matrices and caps.

Score matrices mix three regimes: small integers (ties, zeros, negatives, all-negative rows and
columns), float32-exact reals, and a wide dynamic range.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from allocation import Constraints

ELEMENTS = {
    "ties": st.integers(-3, 3).map(float),
    "reals": st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32),
    "wide": st.sampled_from([-1e3, -1.0, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e3]),
}


@st.composite
def score_matrices(draw, max_tokens: int = 6, max_features: int = 7, regimes=tuple(ELEMENTS)) -> np.ndarray:
    """(n, F) float64 matrices, 1 <= n <= max_tokens, 1 <= F <= max_features, float32-exact."""
    n_tokens = draw(st.integers(1, max_tokens))
    n_features = draw(st.integers(1, max_features))
    regime = draw(st.sampled_from(regimes))
    return draw(arrays(np.float64, (n_tokens, n_features), elements=ELEMENTS[regime]))


def caps(draw, length: int, other: int):
    """A scalar cap in [0, other + 2] (covers caps >= the other dimension) or a vector of them."""
    if draw(st.booleans()):
        return draw(st.integers(0, other + 2))
    return np.array(draw(st.lists(st.integers(0, other + 2), min_size=length, max_size=length)))


@st.composite
def problems(draw, kinds=("topk", "feature_choice", "mutual_choice", "custom"), **matrix_kwargs):
    """(scores, constraints) pairs; 'custom' draws any mix of token caps, feature caps and budget."""
    scores = draw(score_matrices(**matrix_kwargs))
    n_tokens, n_features = scores.shape
    kind = draw(st.sampled_from(kinds))
    per_token = caps(draw, n_tokens, n_features) if kind == "topk" else None
    per_feature = caps(draw, n_features, n_tokens) if kind == "feature_choice" else None
    total = draw(st.integers(0, n_tokens * n_features + 3)) if kind == "mutual_choice" else None
    if kind == "custom":
        per_token = draw(st.one_of(st.none(), st.just(caps(draw, n_tokens, n_features))))
        per_feature = draw(st.one_of(st.none(), st.just(caps(draw, n_features, n_tokens))))
        total = draw(st.one_of(st.none(), st.integers(0, n_tokens * n_features + 3)))
    return scores, Constraints(per_token=per_token, per_feature=per_feature, total=total)


def tolerance(scores: np.ndarray) -> float:
    """Objective tolerance scaled to the data: 1e-9 relative to sum |S|, in float64."""
    return 1e-9 * (1.0 + float(np.abs(scores).sum()))


def assert_feasible(mask: np.ndarray, scores: np.ndarray, constraints: Constraints) -> None:
    """Every cap holds and only positive scores are selected."""
    caps_ = constraints.resolve(*scores.shape)
    assert mask.dtype == bool and mask.shape == scores.shape
    assert not np.any(mask & (scores <= 0)), "selected a non-positive score"
    if caps_.per_token is not None:
        assert np.all(mask.sum(axis=1) <= caps_.per_token), "per-token cap exceeded"
    if caps_.per_feature is not None:
        assert np.all(mask.sum(axis=0) <= caps_.per_feature), "per-feature cap exceeded"
    if caps_.total is not None:
        assert mask.sum() <= caps_.total, "budget exceeded"
