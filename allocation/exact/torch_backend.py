"""``solve(..., backend="torch")``: the certified torch auction, as an ``Allocation``."""

from __future__ import annotations

import numpy as np
import torch

from ..constraints import Constraints
from ..exact_torch.solver import solve_mixed
from .result import Allocation


def solve_as_allocation(scores: np.ndarray, constraints: Constraints) -> Allocation:
    """``solve_mixed`` on a float64 numpy matrix, as an ``allocation.Allocation`` (backend "torch")."""
    solution = solve_mixed(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float64)), constraints)
    caps = constraints.resolve(*scores.shape)
    token = solution.token_prices.cpu().numpy() if caps.per_token is not None else None
    feature = solution.feature_prices.cpu().numpy() if caps.per_feature is not None else None
    budget = solution.budget_price if caps.total is not None else None
    return Allocation(solution.mask.cpu().numpy(), solution.objective, token, feature, budget, "torch",
                      solution.seconds)
