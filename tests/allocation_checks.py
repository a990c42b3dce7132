"""Checks shared by the foundation's property tests; the problems are drawn from ``allocation.testing``.

``problems(kinds)`` picks which caps the public ``allocation_problems`` strategy draws, and hands the
scores over as float64 numpy arrays (float32-exact: drawn as float32 tensors, so a float32 rule sees
exactly the matrix the float64 solver does). Magnitudes span 1e-3 .. 1e3 (a dynamic range of 1e6): the
tests hold the solvers to 1e-9 of sum |S|, which HiGHS' absolute tolerances meet there but not at the
public strategies' default range of 1e12 (``allocation.verify`` allows float32's 8 eps for that).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from hypothesis import strategies as st

from allocation import Constraints, _selection
from allocation.testing import allocation_problems, score_elements
from allocation.testing import score_matrices as tensor_score_matrices
from allocation.verification.strategies import REGIMES

MAX_MAGNITUDE, MIN_MAGNITUDE = 1e3, 1e-3

CAPS_OF_KIND = {
    "topk": {"per_token": True, "per_feature": False, "total": False},
    "feature_choice": {"per_token": False, "per_feature": True, "total": False},
    "mutual_choice": {"per_token": False, "per_feature": False, "total": True},
    "custom": {},  # any mix, each family drawn
}


def _numpy(scores: torch.Tensor) -> np.ndarray:
    return scores.to(torch.float64).numpy()


def _elements(draw, regime):
    chosen = draw(st.sampled_from(REGIMES)) if regime is None else regime
    # the wide regime's scaled integers reach 1e-6 whatever min_magnitude says: zero them below it
    return score_elements(chosen, MAX_MAGNITUDE, MIN_MAGNITUDE).map(lambda x: x if abs(x) >= MIN_MAGNITUDE else 0.0)


@st.composite
def score_matrices(draw, max_tokens: int = 6, max_features: int = 7, regime=None) -> np.ndarray:
    """allocation.testing.score_matrices (one regime per matrix) as float64 numpy arrays (float32-exact)."""
    elements = _elements(draw, regime)
    return _numpy(draw(tensor_score_matrices(max_tokens=max_tokens, max_features=max_features, elements=elements)))


@st.composite
def problems(draw, kinds=tuple(CAPS_OF_KIND), max_tokens: int = 6, max_features: int = 7, regime=None):
    """(scores, constraints): allocation.testing.allocation_problems with the caps of one of ``kinds``."""
    kind = draw(st.sampled_from(kinds))
    scores, constraints = draw(allocation_problems(max_tokens=max_tokens, max_features=max_features,
                                                   elements=_elements(draw, regime), **CAPS_OF_KIND[kind]))
    return _numpy(scores), constraints


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


@contextlib.contextmanager
def blocked_everywhere(rows_per_block: int = 8):
    """Force the blocked path on any size: no size threshold, no gather limit, small blocks, and
    a low bar for padding wide columns apart (so both padded groups occur on small matrices)."""
    names = ("BLOCKED_MIN_NUMEL", "BLOCKED_MIN_NUMEL_OVERALL", "MAX_GATHER_FRACTION", "ROWS_PER_BLOCK",
             "WIDE_COLUMN_MIN", "WIDE_COLUMN_FACTOR")
    saved = {name: getattr(_selection, name) for name in names}
    forced = {"BLOCKED_MIN_NUMEL": 0, "BLOCKED_MIN_NUMEL_OVERALL": 0, "MAX_GATHER_FRACTION": float("inf"),
              "ROWS_PER_BLOCK": rows_per_block,
              "WIDE_COLUMN_MIN": 1, "WIDE_COLUMN_FACTOR": 1.0}  # columns above the mean are padded apart
    for name, value in forced.items():
        setattr(_selection, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_selection, name, value)
