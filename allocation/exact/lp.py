"""One LP builder for every Constraints mix, over the positive entries only.

Variables x_e in [0, 1], one per entry e = (i, j) with S_ij > 0 (an entry with S_ij <= 0 can only
lower the objective, so it is fixed at 0). Rows of A x <= b, in this order: one per token cap
(sum_j x_ij <= k_i), one per feature cap (sum_i x_ij <= m_j), one for the budget (sum x <= B).
The matrix is the incidence matrix of a bipartite flow network plus an all-ones row, so it is
totally unimodular and every vertex of the LP is 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp

from ..constraints import ResolvedCaps


@dataclass(frozen=True)
class LinearProgram:
    """max c^T x  s.t.  A x <= b, 0 <= x <= 1; ``rows``/``cols`` map x back to the matrix."""

    objective: np.ndarray  # (n_vars,) positive scores
    rows: np.ndarray  # (n_vars,) token index of each variable
    cols: np.ndarray  # (n_vars,) feature index of each variable
    A: sp.csr_matrix  # (n_constraints, n_vars)
    b: np.ndarray  # (n_constraints,)
    token_rows: Optional[slice]  # rows of A holding the token caps
    feature_rows: Optional[slice]
    budget_row: Optional[int]


def build_lp(scores: np.ndarray, caps: ResolvedCaps) -> LinearProgram:
    """Build the allocation LP for a finite (n, F) float64 score matrix."""
    rows, cols = np.nonzero(scores > 0)
    n_vars = rows.shape[0]
    blocks, bounds = [], []
    token_rows = feature_rows = budget_row = None
    offset = 0
    ones = np.ones(n_vars)
    if caps.per_token is not None:
        blocks.append(sp.csr_matrix((ones, (rows, np.arange(n_vars))), shape=(caps.n_tokens, n_vars)))
        bounds.append(caps.per_token.astype(np.float64))
        token_rows = slice(offset, offset + caps.n_tokens)
        offset += caps.n_tokens
    if caps.per_feature is not None:
        blocks.append(sp.csr_matrix((ones, (cols, np.arange(n_vars))), shape=(caps.n_features, n_vars)))
        bounds.append(caps.per_feature.astype(np.float64))
        feature_rows = slice(offset, offset + caps.n_features)
        offset += caps.n_features
    if caps.total is not None:
        blocks.append(sp.csr_matrix(ones[None, :]))
        bounds.append(np.array([float(caps.total)]))
        budget_row = offset
        offset += 1
    A = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_vars))
    b = np.concatenate(bounds) if bounds else np.zeros(0)
    return LinearProgram(scores[rows, cols], rows, cols, A, b, token_rows, feature_rows, budget_row)


def prices_from_duals(lp: LinearProgram, duals: np.ndarray):
    """Split the duals of A x <= b (>= 0) into token, feature and budget prices (None if absent)."""
    duals = np.maximum(np.asarray(duals, dtype=np.float64), 0.0)
    token = duals[lp.token_rows].copy() if lp.token_rows is not None else None
    feature = duals[lp.feature_rows].copy() if lp.feature_rows is not None else None
    budget = float(duals[lp.budget_row]) if lp.budget_row is not None else None
    return token, feature, budget
