"""Exact allocation: the LP solved by cvxpy or scipy (HiGHS); the ground truth for every rule."""

from .result import Allocation
from .solve import BACKENDS, solve

__all__ = ["Allocation", "BACKENDS", "solve"]
