"""Tools for your own test suite: hypothesis strategies for allocation problems and ``assert_optimal``.

    from allocation import Constraints
    from allocation.testing import assert_optimal, score_matrices

    def test_my_rule_is_topk_optimal():
        assert_optimal(my_rule, Constraints.topk(2), examples=100)

    @given(score_matrices(max_tokens=4, max_features=6))
    def test_my_property(scores): ...
"""

from __future__ import annotations

from typing import Callable

import torch

from .verification import VerificationReport, verify
from .verification.run import ConstraintsLike
from .verification.strategies import allocation_problems, constraints, score_elements, score_matrices

__all__ = ["allocation_problems", "assert_optimal", "constraints", "score_elements", "score_matrices"]


def assert_optimal(rule: Callable[[torch.Tensor], torch.Tensor], constraints: ConstraintsLike,
                   **verify_kwargs) -> VerificationReport:
    """``verify(rule, constraints, **verify_kwargs)``; raise AssertionError(str(report)) unless ok.

    Inside a test that is itself ``@given``, add
    ``@settings(suppress_health_check=[HealthCheck.nested_given])`` to that test (hypothesis warns
    about nesting searches; here it is intended).
    """
    __tracebackhide__ = True  # pytest shows the caller's line and the report, not this function
    report = verify(rule, constraints, **verify_kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report
