"""Errors raised by the package; each names the offending argument and the fix."""

from __future__ import annotations


class AllocationError(ValueError):
    """Base class: bad input or an allocation problem that cannot be solved as asked."""


class InfeasibleError(AllocationError):
    """The constraints admit no mask (never raised for caps >= 0: the empty mask is feasible)."""


class SolverError(AllocationError):
    """An exact backend failed, or returned a non-integral vertex."""
