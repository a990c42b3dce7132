"""Constraints: per-token caps k_i, per-feature caps m_j and a total budget B.

The allocation problem they define is

    max_M  sum_ij S_ij M_ij   s.t.  M 1 <= k,  M^T 1 <= m,  1^T M 1 <= B,  M in {0,1}^{n x F}.

Any cap may be absent (None = infinite). Caps are non-negative integers; a scalar cap applies to
every token (or feature), a vector gives one cap each. A cap larger than a matrix can use (a token
cap above F, a feature cap above n, a budget above n F) means "no cap" for that matrix: ``resolve``
clips it to that bound, which leaves the constraint set unchanged, so any size (2**63, 10**20) works
with every solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Optional, Union

import numpy as np

from .errors import AllocationError

try:  # torch is a runtime dependency, but constraints must not need it to be importable
    import torch
except ImportError:  # pragma: no cover
    torch = None

CapLike = Union[int, np.ndarray, "torch.Tensor", list, tuple, None]
UNLIMITED = 2**62  # vector entries above this are stored as this (no matrix has 2**62 rows or columns)


def _as_cap(value: CapLike, name: str) -> Union[int, np.ndarray, None]:
    """Validate one cap: None, a non-negative int, or a 1-D vector of non-negative ints."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise AllocationError(f"{name} must be a non-negative integer or a vector of them, got a bool")
    if isinstance(value, Integral):
        if value < 0:
            raise AllocationError(f"{name} must be >= 0, got {value}; use 0 to select nothing")
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise AllocationError(f"{name} must be an integer, got {value}; round it yourself")
        return _as_cap(int(value), name)
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object and array.ndim == 1 and all(
        isinstance(v, Integral) and not isinstance(v, bool) for v in array
    ):  # Python ints beyond int64 (e.g. [1, 10**30]): unlimited for any matrix
        array = np.array([min(int(v), UNLIMITED) if v >= 0 else -1 for v in array], dtype=np.int64)
    if array.dtype.kind not in "iuf":
        raise AllocationError(f"{name} must hold finite integers, got {type(value).__name__} {value!r}")
    if array.ndim == 0:
        return _as_cap(array.item(), name)
    if array.ndim != 1:
        raise AllocationError(f"{name} must be an int or a 1-D vector, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise AllocationError(f"{name} must hold finite integers, got dtype {array.dtype}")
    if np.any(array != np.round(array)):
        raise AllocationError(f"{name} must hold integers; round the capacities before passing them")
    if np.any(array < 0):
        raise AllocationError(f"{name} must be >= 0 everywhere; found {array.min()}")
    array = np.minimum(array, UNLIMITED).astype(np.int64)  # int64-safe; still unlimited for any matrix
    array.setflags(write=False)
    return array


def _expand(
    cap: Union[int, np.ndarray, None], length: int, name: str, axis: str, most: int
) -> Optional[np.ndarray]:
    """``cap`` as one int64 per token (or feature), clipped to ``most``, the largest usable value."""
    if cap is None:
        return None
    if isinstance(cap, int):
        return np.full(length, min(cap, most), dtype=np.int64)
    if cap.shape[0] != length:
        raise AllocationError(
            f"{name} has length {cap.shape[0]} but scores have {length} {axis}; "
            f"pass one cap per {axis[:-1]} or a single int"
        )
    return np.minimum(cap, most) if np.any(cap > most) else cap


@dataclass(frozen=True)
class ResolvedCaps:
    """Caps expanded to the shape of one score matrix: vectors of length n and F, or None."""

    n_tokens: int
    n_features: int
    per_token: Optional[np.ndarray]  # (n_tokens,) int64
    per_feature: Optional[np.ndarray]  # (n_features,) int64
    total: Optional[int]


@dataclass(frozen=True, eq=False)
class Constraints:
    """Caps of an allocation problem: ``per_token`` k_i, ``per_feature`` m_j, ``total`` B.

    Use the named constructors for the standard rules::

        Constraints.topk(8)               # each token at most 8 features
        Constraints.feature_choice(m)     # feature j at most m[j] tokens
        Constraints.mutual_choice(8 * n)  # at most 8n entries in all
    """

    per_token: CapLike = None
    per_feature: CapLike = None
    total: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_token", _as_cap(self.per_token, "per_token"))
        object.__setattr__(self, "per_feature", _as_cap(self.per_feature, "per_feature"))
        total = _as_cap(self.total, "total")
        if isinstance(total, np.ndarray):
            raise AllocationError("total must be a single integer budget, not a vector")
        object.__setattr__(self, "total", total)

    @classmethod
    def topk(cls, k: CapLike) -> "Constraints":
        """TopK: each token (row) keeps at most k features."""
        return cls(per_token=k)

    @classmethod
    def feature_choice(cls, m: CapLike) -> "Constraints":
        """Feature Choice: each feature (column) keeps at most m (or m_j) tokens."""
        return cls(per_feature=m)

    @classmethod
    def mutual_choice(cls, total: int) -> "Constraints":
        """Mutual Choice (BatchTopK): at most ``total`` entries in the whole matrix."""
        return cls(total=total)

    @property
    def kind(self) -> str:
        """'topk', 'feature_choice', 'mutual_choice', 'unconstrained' or 'custom'."""
        present = (self.per_token is not None, self.per_feature is not None, self.total is not None)
        names = {
            (True, False, False): "topk",
            (False, True, False): "feature_choice",
            (False, False, True): "mutual_choice",
            (False, False, False): "unconstrained",
        }
        return names.get(present, "custom")

    @property
    def greedy_exact(self) -> bool:
        """True unless both per-token and per-feature caps are present (then greedy is not exact)."""
        return self.per_token is None or self.per_feature is None

    def resolve(self, n_tokens: int, n_features: int) -> ResolvedCaps:
        """Expand scalar caps to vectors for an (n_tokens, n_features) score matrix.

        Caps above what the matrix can use are clipped to it (a token cap to F, a feature cap to n,
        the budget to n F): the same constraint set, in numbers every backend handles.
        """
        return ResolvedCaps(
            n_tokens=n_tokens,
            n_features=n_features,
            per_token=_expand(self.per_token, n_tokens, "per_token", "tokens", n_features),
            per_feature=_expand(self.per_feature, n_features, "per_feature", "features", n_tokens),
            total=None if self.total is None else min(self.total, n_tokens * n_features),
        )

    def __repr__(self) -> str:
        def show(cap):
            if isinstance(cap, np.ndarray):
                return f"vector(len={cap.shape[0]}, min={cap.min(initial=0)}, max={cap.max(initial=0)})"
            return repr(cap)

        parts = [f"{name}={show(getattr(self, name))}" for name in ("per_token", "per_feature", "total")
                 if getattr(self, name) is not None]
        return f"Constraints({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Constraints):
            return NotImplemented
        return all(np.array_equal(np.asarray(getattr(self, a) if getattr(self, a) is not None else -1),
                                  np.asarray(getattr(other, a) if getattr(other, a) is not None else -1))
                   for a in ("per_token", "per_feature", "total"))

    __hash__ = None  # type: ignore[assignment]
