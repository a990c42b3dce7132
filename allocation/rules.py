"""PyTorch allocation rules: TopK, Feature Choice, Mutual Choice and their laminar mixes.

Every rule is one greedy core, ``select_top``, applied along a dimension: per row (TopK), per
column (Feature Choice) or over the whole matrix (Mutual Choice). Greedy is exact whenever the caps
form one laminar family (token caps and/or a budget, or feature caps and/or a budget); caps on
tokens AND features together need the exact solver. Only positive scores are ever selected.
Masks are ``bool`` tensors on the scores' device; ties are broken by ``torch.topk``, so exactly the
cap is selected (objectives, not masks, are unique).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import _selection
from ._validate import check_scores_torch
from .constraints import CapLike, Constraints, _as_cap, _expand
from .errors import AllocationError

Cap = Union[int, np.ndarray, Tensor, list, tuple]


def select_top(scores: Tensor, count: Union[int, Tensor], dim: Optional[int]) -> Tensor:
    """Greedy core: the ``count`` largest positive scores per slice along ``dim`` (None = all).

    ``count`` is an int, or for dim 0 / 1 a vector with one count per column / row. Returns a bool
    mask of ``scores``' shape. Per column and over the whole matrix, large inputs go through the
    blocked path (threshold from block maxima, exact top among the candidates; see
    ``allocation._selection``), which falls back to ``torch.topk`` whenever it would not pay off.
    """
    if _selection.blocked_pays(scores.numel(), dim):
        mask = _selection.select_top_blocked(scores, count, dim)
        if mask is not None:
            return mask
    return _selection.select_top_plain(scores, count, dim)


def select_priced(scores: Tensor, count: Union[int, Tensor], dim: Optional[int], reach: Optional[Tensor] = None
                  ) -> tuple[Tensor, Optional[_selection.ColumnFrontier]]:
    """``select_top(scores, count, dim)`` per column (dim 0) or overall (None) and, where the blocked
    path chose, the candidates it chose from, priced (``allocation._selection.ColumnFrontier``).

    ``reach`` ((F,) per column, a scalar overall): list the entries above it too where that is cheap.
    """
    if _selection.blocked_pays(scores.numel(), dim):
        scores_ = scores.detach().contiguous()
        if dim == 0:
            counts = _selection.count_vector(count, scores.shape[1], scores.device)
            found = _selection.top_per_column_frontier(scores_, counts, reach)
        else:
            found = _selection.top_overall_frontier(scores_, int(count), reach)
        if found is not None:
            return found
    return _selection.select_top_plain(scores, count, dim), None


def _cap_for_torch(cap: CapLike, name: str, length: int, axis: str, most: int) -> Union[int, Tensor]:
    """A validated cap (required) as an int, or as an int64 tensor of the right length; caps above
    ``most`` (what the matrix can use) are clipped to it, which changes no mask."""
    validated = _as_cap(cap, name)
    if validated is None:
        raise AllocationError(f"{name} is required, got None")
    if isinstance(validated, int):
        return min(validated, most)
    return _as_count(_expand(validated, length, name, axis, most))


def topk(scores: Tensor, k: Cap) -> Tensor:
    """TopK mask: max <S, M> s.t. M 1 <= k (each token keeps its k largest positive scores)."""
    check_scores_torch(scores)
    return select_top(scores, _cap_for_torch(k, "k", scores.shape[0], "tokens", scores.shape[1]), dim=1)


def feature_choice(scores: Tensor, m: Cap) -> Tensor:
    """Feature Choice mask: max <S, M> s.t. M^T 1 <= m (feature j keeps its m_j best tokens)."""
    check_scores_torch(scores)
    return select_top(scores, _cap_for_torch(m, "m", scores.shape[1], "features", scores.shape[0]), dim=0)


def mutual_choice(scores: Tensor, total: int) -> Tensor:
    """Mutual Choice mask: max <S, M> s.t. 1^T M 1 <= total (the largest positive entries)."""
    check_scores_torch(scores)
    return select_top(scores, _cap_for_torch(total, "total", 1, "budgets", scores.numel()), dim=None)


def allocate(scores: Tensor, constraints: Constraints) -> Tensor:
    """Exact mask for any ``constraints``: greedy for laminar caps, else the certified auction.

    Laminar caps: per-family greedy, then the budget over the rest. Per-token AND per-feature caps
    (where no greedy rule is exact) go to ``allocation.exact_torch.solve_mixed``, an auction whose
    answer is checked by an LP-duality certificate (CertificateWarning + scipy if it fails).
    """
    check_scores_torch(scores)
    return allocate_unchecked(scores, constraints)


def allocate_unchecked(scores: Tensor, constraints: Constraints) -> Tensor:
    """``allocate`` for scores the caller has already checked (finite floating (n, F)): no pass over S."""
    if not isinstance(constraints, Constraints):
        raise AllocationError(f"constraints must be an allocation.Constraints, got {type(constraints).__name__}")
    if not constraints.greedy_exact:  # token AND feature caps: no greedy is exact, auction + certificate
        from .exact_torch import solve_mixed

        return solve_mixed(scores, constraints).mask
    caps = constraints.resolve(*scores.shape)
    mask = None
    if caps.per_token is not None:
        mask = select_top(scores, _as_count(caps.per_token), dim=1)
    if caps.per_feature is not None:
        mask = select_top(scores, _as_count(caps.per_feature), dim=0)
    if caps.total is not None:
        candidates = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
        mask = select_top(candidates, caps.total, dim=None)
    if mask is None:  # unconstrained: every positive score
        mask = scores > 0
    return mask


def _as_count(cap: np.ndarray) -> Union[int, Tensor]:
    """A cap vector as an int when all entries agree (the faster uniform path), else a tensor."""
    if cap.size and np.all(cap == cap[0]):
        return int(cap[0])
    return torch.from_numpy(cap.copy())


def activations(scores: Tensor, mask: Tensor) -> Tensor:
    """Sparse activations f = S * M; gradients flow to the kept scores only."""
    return torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


def topk_activations(scores: Tensor, k: Cap) -> Tensor:
    """TopK activations: the kept scores, zeros elsewhere (differentiable in the kept scores)."""
    return activations(scores, topk(scores, k))


def feature_choice_activations(scores: Tensor, m: Cap) -> Tensor:
    """Feature Choice activations: the kept scores, zeros elsewhere."""
    return activations(scores, feature_choice(scores, m))


def mutual_choice_activations(scores: Tensor, total: int) -> Tensor:
    """Mutual Choice activations: the kept scores, zeros elsewhere."""
    return activations(scores, mutual_choice(scores, total))


def allocate_activations(scores: Tensor, constraints: Constraints) -> Tensor:
    """Activations of ``allocate``: the kept scores, zeros elsewhere."""
    return activations(scores, allocate(scores, constraints))
