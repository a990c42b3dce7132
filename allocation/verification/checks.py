"""Checks of one rule output against the exact optimum: output, feasibility, optimality.

A rule's output passes when it is a bool mask or numeric activations (nonzero = selected) of the
scores' shape and device, without NaN or inf; it selects only positive scores; it respects every
cap; and its objective sum(S * M) is within ``tolerance`` of the exact optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..constraints import Constraints
from ..errors import SolverError
from ..exact import solve

# Default allowed gap: RELATIVE_SLACK_IN_EPS * eps(dtype) * (1 + sum |S|). A rule that computes in
# its own dtype may mis-order entries closer than its rounding error; each such swap costs at most
# about eps * |S_ij|, so the total loss is at most about eps * sum |S|. float32: 9.5e-7 relative.
# The "1 +" keeps an absolute floor: the HiGHS reference works with absolute tolerances (it ignores
# positive scores below about 1e-9), so on matrices of tiny scores a purely relative gap would
# blame the rule for the reference's rounding.
RELATIVE_SLACK_IN_EPS = 8
# Floor for float64: the HiGHS reference accepts a vertex whose reduced costs are within its dual
# feasibility tolerance (1e-7 by default), so its optimum can be short of the true one by a small
# relative amount: 1.2e-10 * (1 + sum |S|) at worst over 1500 random float64 TopK instances, but
# 1.9e-9 on a verify example with scores from 1e-6 to 1e6 (regression:
# test_verified_rule_exits_0 refused an exact top-2 rule as "above the optimum" with a 1e-9 floor).
MIN_RELATIVE_TOLERANCE = 1e-8


@dataclass(frozen=True)
class Outcome:
    """What one example gave: ``check`` is None when every check passed."""

    check: Optional[str]
    rule_mask: Optional[torch.Tensor]  # (n, F) bool on the CPU, None when the output is unusable
    rule_objective: Optional[float]
    optimal_mask: torch.Tensor  # (n, F) bool on the CPU
    optimal_objective: float
    constraints: Constraints
    tolerance: float


def default_tolerance(scores: torch.Tensor) -> float:
    """Allowed objective gap: max(8 eps(dtype), 1e-8) * (1 + sum |S|)."""
    relative = max(RELATIVE_SLACK_IN_EPS * torch.finfo(scores.dtype).eps, MIN_RELATIVE_TOLERANCE)
    return relative * (1.0 + float(scores.detach().abs().to(torch.float64).sum()))


def check_example(rule: Callable, scores: torch.Tensor, constraints: Constraints,
                  tolerance: Optional[float]) -> Outcome:
    """Run ``rule`` on a copy of ``scores`` and check its output against the exact optimum."""
    values = scores.detach().to("cpu", torch.float64).numpy()  # exactly the values the rule sees
    optimum = solve(values, constraints)
    optimal_objective = _objective(values, optimum.mask)
    gap_allowed = default_tolerance(scores) if tolerance is None else float(tolerance)

    def outcome(check, mask=None, objective=None):
        return Outcome(check, mask, objective, torch.from_numpy(optimum.mask.copy()), optimal_objective,
                       constraints, gap_allowed)

    try:
        output = rule(scores.clone())
    except Exception as error:  # noqa: BLE001 - any failure of the user's rule is a finding
        return outcome(f"error: rule raised {type(error).__name__}: {error}")
    problem = _output_problem(output, scores)
    if problem is not None:
        return outcome(f"output: {problem}")
    mask = (output if output.dtype == torch.bool else output != 0).detach().to("cpu")
    mask_np = mask.numpy()
    objective = _objective(values, mask_np)
    problem = _feasibility_problem(mask_np, values, constraints)
    if problem is not None:
        return outcome(f"feasibility: {problem}", mask, objective)
    gap = optimal_objective - objective
    if gap > gap_allowed:
        return outcome(
            f"optimality: objective {objective:.10g} is below the optimum {optimal_objective:.10g} "
            f"(gap {gap:.3g} > tolerance {gap_allowed:.3g})", mask, objective)
    if -gap > max(gap_allowed, default_tolerance(scores)):
        raise SolverError(
            f"a feasible mask scored {objective!r} above the exact optimum {optimal_objective!r}: "
            "the reference solver is wrong; please report this with the scores"
        )
    return outcome(None, mask, objective)


def _objective(values: np.ndarray, mask: np.ndarray) -> float:
    """sum of the selected scores, correctly rounded (fsum): equal multisets give equal sums, so
    two optimal masks that differ only on ties have exactly the same objective."""
    return math.fsum(values[mask].tolist())


def _output_problem(output, scores: torch.Tensor) -> Optional[str]:
    """Why the output is not a usable mask or activations, or None."""
    if not isinstance(output, torch.Tensor):
        return (f"rule returned {type(output).__name__}, expected a torch.Tensor "
                "(a bool mask, or activations where nonzero = selected)")
    if tuple(output.shape) != tuple(scores.shape):
        return f"rule returned shape {tuple(output.shape)}, expected the scores' shape {tuple(scores.shape)}"
    if output.dtype != torch.bool and (output.is_complex() or not (output.is_floating_point()
                                                                    or _is_integer(output.dtype))):
        return f"rule returned dtype {output.dtype}; expected torch.bool (a mask) or a real numeric dtype"
    if output.device != scores.device:
        return f"rule returned a tensor on {output.device}, but the scores are on {scores.device}"
    if output.is_floating_point():
        bad = ~torch.isfinite(output)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            return f"rule returned {output[i, j].item()} at token {i}, feature {j} (NaN or inf activations)"
    return None


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _feasibility_problem(mask: np.ndarray, values: np.ndarray, constraints: Constraints) -> Optional[str]:
    """The first violated requirement: positive scores only, then token, feature and budget caps."""
    non_positive = np.argwhere(mask & (values <= 0))
    if non_positive.size:
        i, j = (int(v) for v in non_positive[0])
        return (f"selected the non-positive score {values[i, j]:.10g} at token {i}, feature {j} "
                "(only positive scores may be selected: they lower the objective)")
    caps = constraints.resolve(*values.shape)
    for name, cap, axis, what in (("per_token", caps.per_token, 1, "token"),
                                  ("per_feature", caps.per_feature, 0, "feature")):
        if cap is None:
            continue
        counts = mask.sum(axis=axis)
        over = np.flatnonzero(counts > cap)
        if over.size:
            at = int(over[0])
            return f"{name} cap exceeded at {what} {at} ({counts[at]} > {cap[at]})"
    if caps.total is not None and mask.sum() > caps.total:
        return f"total budget exceeded ({int(mask.sum())} > {caps.total})"
    return None
