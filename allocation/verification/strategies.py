"""Hypothesis strategies for allocation problems: score matrices (torch tensors) and Constraints.

Score matrices are built to break allocation rules: ties and duplicates (small integers, copied
rows and columns), zeros and negative scores (which must never be selected), all non-positive rows
and columns, and a wide dynamic range (1e-6 next to 1e6). Every draw shrinks towards a small
matrix of small integers, so a counterexample found by hypothesis ends up readable, e.g.
``[[3, 2], [2, 0]]``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ..constraints import Constraints
from ..errors import AllocationError

DEFAULT_MAX_MAGNITUDE = 1e6
# Nonzero scores are at least this large in magnitude. ``solve`` hands HiGHS S / max(S), whose
# absolute tolerances (~1e-7 to 1e-9) still blur entries that many orders below the largest one;
# 1e-6 next to 1e6 keeps a dynamic range of 12 orders of magnitude, more than float32 resolves
# within one matrix, and ``verify``'s objective tolerance scales with sum |S|.
DEFAULT_MIN_MAGNITUDE = 1e-6

# Magnitudes that mix in one matrix to give a large dynamic range (times a small integer).
SCALES = (1e-6, 1e-3, 1e3, 1e6)


def _check_range(low: int, high: int, name: str) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        raise AllocationError(f"min_{name} and max_{name} must be integers, got {low!r} and {high!r}")
    if not 1 <= low <= high:
        raise AllocationError(
            f"need 1 <= min_{name} <= max_{name}, got min_{name}={low}, max_{name}={high}"
        )


def _magnitude_for(dtype: torch.dtype, max_magnitude: float, max_entries: int) -> float:
    """Largest |S_ij| to draw: ``max_magnitude``, lowered so a whole matrix sums finitely in ``dtype``."""
    if not dtype.is_floating_point:
        raise AllocationError(f"dtype must be a floating torch dtype, got {dtype}")
    if not (max_magnitude > 0 and np.isfinite(max_magnitude)):
        raise AllocationError(f"max_magnitude must be a positive finite number, got {max_magnitude!r}")
    return float(min(max_magnitude, torch.finfo(dtype).max / (4 * max_entries)))


REGIMES = ("integers", "reals", "wide")


def score_elements(regime: str = "integers", max_magnitude: float = DEFAULT_MAX_MAGNITUDE,
                   min_magnitude: float = DEFAULT_MIN_MAGNITUDE) -> st.SearchStrategy[float]:
    """One score, in one of three regimes (a matrix draws one regime for all its entries):

    - ``"integers"``: -3 .. 12; ties, zeros and negatives on every draw, and sums that compete with
      single entries (what refutes greedy rules); shrinks to 0, 1, 2, ...
    - ``"reals"``: any float in [-100, 100] (distinct values, near-ties).
    - ``"wide"``: small integers times 1e-6, 1e-3, 1e3 or 1e6, or any float in
      [-max_magnitude, max_magnitude]: a large dynamic range within one matrix.

    Nonzero reals have |x| >= ``min_magnitude`` (smaller draws become 0; see DEFAULT_MIN_MAGNITUDE).
    """
    if regime == "integers":
        return st.integers(-3, 12).map(float)

    def reals(bound: float) -> st.SearchStrategy[float]:
        return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False).map(
            lambda x: x if abs(x) >= min_magnitude else 0.0)

    if regime == "reals":
        return reals(min(100.0, max_magnitude))
    if regime == "wide":
        scaled = st.builds(
            lambda integer, scale: float(np.clip(integer * scale, -max_magnitude, max_magnitude)),
            st.integers(-9, 9),
            st.sampled_from(SCALES),
        )
        return st.one_of(scaled, reals(max_magnitude))
    raise AllocationError(f"regime must be one of {REGIMES}, got {regime!r}")


def score_matrices(
    min_tokens: int = 1,
    max_tokens: int = 8,
    min_features: int = 1,
    max_features: int = 8,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    max_magnitude: float = DEFAULT_MAX_MAGNITUDE,
    elements: Optional[st.SearchStrategy[float]] = None,
    structure: bool = True,
) -> st.SearchStrategy[torch.Tensor]:
    """Score matrices S, torch tensors of shape (n_tokens, n_features) with finite entries.

    Parameters
    ----------
    min_tokens, max_tokens : rows n, drawn in [min_tokens, max_tokens] (shrinks to min_tokens).
    min_features, max_features : columns F, drawn in [min_features, max_features].
    dtype, device : of the returned tensor. Entries are drawn in float64 then cast, so a low
        precision dtype adds its own rounding ties; the tensor holds exactly what a rule will see.
    max_magnitude : bound on |S_ij| (default 1e6); lowered automatically for float16/bfloat16 so
        that the sum of a whole matrix stays finite in that dtype.
    elements : strategy for one entry (floats). Default: each matrix draws one regime of
        ``score_elements`` ("integers", "reals" or "wide"; shrinks to "integers").
    structure : when True (default) also draw structure that breaks rules: rows and columns made
        all non-positive (S_ij -> -|S_ij|), and rows and columns copied onto others (duplicates).
        Each structural edit shrinks away when it is not needed for a failure.
    """
    _check_range(min_tokens, max_tokens, "tokens")
    _check_range(min_features, max_features, "features")
    magnitude = _magnitude_for(dtype, max_magnitude, max_tokens * max_features)
    if elements is None:
        elements = st.sampled_from([score_elements(regime, magnitude) for regime in REGIMES])
    else:
        elements = st.just(elements)
    return _score_matrices(min_tokens, max_tokens, min_features, max_features, dtype, device, elements,
                           structure)


@st.composite
def _score_matrices(draw, min_tokens, max_tokens, min_features, max_features, dtype, device,
                    element_strategies, structure):
    elements = draw(element_strategies)
    n_tokens = draw(st.integers(min_tokens, max_tokens))
    n_features = draw(st.integers(min_features, max_features))
    values = draw(arrays(np.float64, (n_tokens, n_features), elements=elements))
    if structure:
        values = _add_structure(draw, values)
    return torch.tensor(values, dtype=dtype, device=device)


def _add_structure(draw, values: np.ndarray) -> np.ndarray:
    """Copy some rows / columns onto others, then make some rows / columns all non-positive."""
    n_tokens, n_features = values.shape
    values = values.copy()
    pair = st.tuples
    for source, target in draw(st.lists(pair(st.integers(0, n_tokens - 1), st.integers(0, n_tokens - 1)),
                                        max_size=2)):
        values[target, :] = values[source, :]
    for source, target in draw(st.lists(pair(st.integers(0, n_features - 1),
                                             st.integers(0, n_features - 1)), max_size=2)):
        values[:, target] = values[:, source]
    for row in draw(st.sets(st.integers(0, n_tokens - 1), max_size=2)):
        values[row, :] = -np.abs(values[row, :])
    for column in draw(st.sets(st.integers(0, n_features - 1), max_size=2)):
        values[:, column] = -np.abs(values[:, column])
    return values


def _cap(draw, length: int, largest: int, vector: bool) -> Union[int, np.ndarray]:
    """A cap in [0, largest]: one int, or (when ``vector``) possibly one int per token/feature."""
    if vector and draw(st.booleans()):
        return np.array(draw(st.lists(st.integers(0, largest), min_size=length, max_size=length)),
                        dtype=np.int64)
    return draw(st.integers(0, largest))


@st.composite
def constraints(
    draw,
    n_tokens: int,
    n_features: int,
    *,
    per_token: Optional[bool] = None,
    per_feature: Optional[bool] = None,
    total: Optional[bool] = None,
    vector_caps: bool = True,
) -> Constraints:
    """Constraints for an (n_tokens, n_features) matrix.

    ``per_token``, ``per_feature``, ``total``: True = always present, False = never, None (default)
    = drawn. Caps range over [0, other dimension + 1] (so caps that never bind are covered) and the
    budget over [0, n * F + 1]; with ``vector_caps`` a cap may be a vector, one entry per token or
    feature. Shrinks towards no caps and caps of 0.
    """
    _check_range(n_tokens, n_tokens, "tokens")
    _check_range(n_features, n_features, "features")

    def present(flag: Optional[bool]) -> bool:
        return draw(st.booleans()) if flag is None else bool(flag)

    token_cap = _cap(draw, n_tokens, n_features + 1, vector_caps) if present(per_token) else None
    feature_cap = _cap(draw, n_features, n_tokens + 1, vector_caps) if present(per_feature) else None
    budget = draw(st.integers(0, n_tokens * n_features + 1)) if present(total) else None
    return Constraints(per_token=token_cap, per_feature=feature_cap, total=budget)


@st.composite
def allocation_problems(
    draw,
    min_tokens: int = 1,
    max_tokens: int = 8,
    min_features: int = 1,
    max_features: int = 8,
    *,
    per_token: Optional[bool] = None,
    per_feature: Optional[bool] = None,
    total: Optional[bool] = None,
    vector_caps: bool = True,
    **matrix_options,
) -> tuple:
    """(scores, constraints) pairs: ``score_matrices(...)`` and ``constraints(...)`` for its shape.

    ``matrix_options`` go to ``score_matrices`` (dtype, device, max_magnitude, elements, structure).
    """
    scores = draw(score_matrices(min_tokens, max_tokens, min_features, max_features, **matrix_options))
    caps = draw(constraints(*scores.shape, per_token=per_token, per_feature=per_feature, total=total,
                            vector_caps=vector_caps))
    return scores, caps
