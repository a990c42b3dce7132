"""Verification of allocation rules: hypothesis-drawn scores, exact optima, shrunk counterexamples."""

from .report import VerificationReport
from .run import verify

__all__ = ["VerificationReport", "verify"]
