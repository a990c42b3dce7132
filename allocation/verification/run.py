"""``verify(rule, constraints)``: hypothesis searches for a score matrix on which a rule is not optimal.

Each example is a score matrix S from ``score_matrices``; the rule's output is checked for being a
mask (or activations), for feasibility (each cap, positive scores only) and for optimality against
the exact LP optimum ``allocation.solve`` (scipy/HiGHS). The first failure is shrunk in three
steps: rows, columns and entries are cut while it still fails (``shrink_matrix``); hypothesis then
searches matrices up to that smaller shape and shrinks what it finds; the simpler result is reported.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky

from .._validate import positive_int
from ..constraints import Constraints
from ..errors import AllocationError
from .checks import Outcome, check_example
from .report import VerificationReport
from .shrink import shrink_matrix
from .strategies import score_matrices

ConstraintsLike = Union[Constraints, Callable[[int, int], Constraints]]


class _Refuted(Exception):
    """Raised inside the hypothesis test when an example fails; carries what the report needs."""

    def __init__(self, scores: torch.Tensor, outcome: Outcome):
        super().__init__(outcome.check)
        self.scores = scores
        self.outcome = outcome


def verify(
    rule: Callable[[torch.Tensor], torch.Tensor],
    constraints: ConstraintsLike,
    *,
    examples: int = 200,
    seed: int = 0,
    min_tokens: int = 1,
    max_tokens: int = 8,
    min_features: int = 1,
    max_features: int = 8,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    tolerance: Optional[float] = None,
) -> VerificationReport:
    """Check that ``rule`` solves max <S, M> s.t. ``constraints`` exactly, on hypothesis-drawn S.

    ``rule(scores)`` takes an (n, F) tensor and returns a bool mask or activations (nonzero =
    selected) of the same shape. ``constraints`` is a ``Constraints`` or a callable
    ``(n_tokens, n_features) -> Constraints`` (caps that depend on the shape). Score matrices have
    ``min_tokens..max_tokens`` rows and ``min_features..max_features`` columns, in ``dtype`` on
    ``device``; ``examples`` of them are drawn from ``seed`` (the same seed gives the same report
    in the same program; hypothesis also draws constants from the imported modules, so another set
    of imports can find another counterexample). A failing example is shrunk to a minimal one.
    ``tolerance`` is the objective gap allowed (absolute); by default
    max(8 eps(dtype), 1e-8) * (1 + sum |S|): about 1e-6 * (1 + sum |S|) in float32, and in float64
    the accuracy of the HiGHS reference (seen 1.9e-9 * (1 + sum |S|) short of the optimum once).

    Every problem with the rule (a wrong answer, an exception, a wrong shape or dtype, NaN) is a
    failed report, never an exception; bad arguments to ``verify`` raise AllocationError.
    """
    if not callable(rule):
        raise AllocationError(f"rule must be callable (scores -> mask), got {type(rule).__name__}")
    positive_int(examples, "examples", allow_integral_float=False)
    if tolerance is not None and not (float(tolerance) >= 0 and np.isfinite(float(tolerance))):
        raise AllocationError(f"tolerance must be a finite number >= 0 (or None), got {tolerance!r}")
    _check_device(device)
    score_matrices(min_tokens, max_tokens, min_features, max_features, dtype=dtype)  # validates the ranges
    constraints_for = _constraints_getter(constraints, (min_tokens, max_tokens), (min_features, max_features))
    name = getattr(rule, "__qualname__", None) or repr(rule)

    def failure(scores: torch.Tensor) -> Optional[Outcome]:
        outcome = check_example(rule, scores, constraints_for(*scores.shape), tolerance)
        return outcome if outcome.check is not None else None

    search = _Search(failure)
    try:
        _run_hypothesis(search, score_matrices(min_tokens, max_tokens, min_features, max_features,
                                               dtype=dtype, device=device),
                        examples, seed, shrink=False)
    except _Refuted as refuted:
        scores, outcome = _minimise(refuted.scores, refuted.outcome, failure, examples, seed, min_tokens,
                                    min_features, dtype, device)
        return _failed_report(scores, outcome, search.first_failure_at, seed, name)
    except Flaky:
        if search.last_failure is None:
            raise
        outcome = search.last_failure.outcome
        check = f"{outcome.check} [nondeterministic: the rule passed when this input was rerun]"
        return _failed_report(search.last_failure.scores, outcome, search.first_failure_at, seed, name, check)
    return VerificationReport(ok=True, examples_run=search.calls, seed=seed, rule_name=name)


def _minimise(scores: torch.Tensor, outcome: Outcome, failure: Callable, examples: int, seed: int,
              min_tokens: int, min_features: int, dtype: torch.dtype, device) -> tuple:
    """Shrink a failing matrix: delete rows and columns (``shrink_matrix``), then let hypothesis
    search shapes up to that smaller one and shrink what it finds; return the simpler result.

    Hypothesis shrinks a small matrix in a fraction of a second but an 8 x 8 one in tens of seconds
    (measured on a loaded 2-core machine), so it shrinks after the shape has been cut down.
    """
    scores, outcome = shrink_matrix(scores, failure, min_tokens, min_features, outcome)
    n_tokens, n_features = scores.shape
    search = _Search(failure)
    try:
        _run_hypothesis(search, score_matrices(min_tokens, n_tokens, min_features, n_features, dtype=dtype,
                                               device=device), examples, seed, shrink=True)
    except (_Refuted, Flaky):
        if search.last_failure is not None:
            candidate, candidate_outcome = shrink_matrix(search.last_failure.scores, failure, min_tokens,
                                                         min_features, search.last_failure.outcome)
            if _simplicity(candidate) < _simplicity(scores):
                scores, outcome = candidate, candidate_outcome
    return scores, outcome


def _simplicity(scores: torch.Tensor) -> tuple:
    """Sort key, smaller is simpler: entries, rows, nonzero entries, largest |S|, non-integers, sum |S|."""
    values = scores.detach().to("cpu", torch.float64)
    return (values.numel(), values.shape[0], int((values != 0).sum()), float(values.abs().max()),
            int((values != values.round()).sum()), float(values.abs().sum()))


class _Search:
    """The hypothesis test body: check one example, raise _Refuted on failure, count calls."""

    def __init__(self, failure: Callable[[torch.Tensor], Optional[Outcome]]):
        self.failure = failure
        self.calls = 0
        self.first_failure_at: int = 0
        self.last_failure: Optional[_Refuted] = None

    def __call__(self, scores: torch.Tensor) -> None:
        self.calls += 1
        outcome = self.failure(scores)
        if outcome is not None:
            if not self.first_failure_at:
                self.first_failure_at = self.calls
            self.last_failure = _Refuted(scores, outcome)
            raise self.last_failure


def _run_hypothesis(body: Callable, strategy, examples: int, seed: int, shrink: bool) -> None:
    """Run ``body`` on ``examples`` draws of ``strategy``; a failure is re-raised (shrunk if asked)."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,  # nothing written to .hypothesis/ in the user's directory
        derandomize=False,  # the seed decides; the caller's hypothesis profile must not
        deadline=None,
        phases=(Phase.generate, Phase.shrink) if shrink else (Phase.generate,),
        report_multiple_bugs=False,  # one counterexample: the simplest failure of any kind
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(strategy)
    def search(scores: torch.Tensor) -> None:
        body(scores)

    search()


def _failed_report(scores: torch.Tensor, outcome: Outcome, examples_run: Optional[int], seed: int,
                   name: str, check: Optional[str] = None) -> VerificationReport:
    return VerificationReport(
        ok=False,
        examples_run=examples_run or 1,
        seed=seed,
        check=check or outcome.check,
        scores=scores.detach().to("cpu"),
        rule_mask=outcome.rule_mask,
        rule_objective=outcome.rule_objective,
        optimal_mask=outcome.optimal_mask,
        optimal_objective=outcome.optimal_objective,
        constraints=outcome.constraints,
        tolerance=outcome.tolerance,
        rule_name=name,
    )


def _check_device(device) -> None:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, AssertionError) as error:
        raise AllocationError(f"device {device!r} is not usable here ({error}); pass device='cpu'") from error


def _constraints_getter(constraints: ConstraintsLike, tokens: tuple, features: tuple) -> Callable:
    """(n, F) -> Constraints, checking a fixed Constraints' vector caps fit every drawn shape."""
    if isinstance(constraints, Constraints):
        axes = (("per_token", tokens, "tokens"), ("per_feature", features, "features"))
        for name, (low, high), axis in axes:
            cap = getattr(constraints, name)
            if isinstance(cap, np.ndarray) and not low == high == cap.shape[0]:
                raise AllocationError(
                    f"{name} is a vector of length {cap.shape[0]} but examples have {low}..{high} {axis}; "
                    f"pass min_{axis}=max_{axis}={cap.shape[0]}, or constraints as a callable "
                    "(n_tokens, n_features) -> Constraints"
                )
        return lambda n_tokens, n_features: constraints
    if not callable(constraints):
        raise AllocationError(
            "constraints must be an allocation.Constraints or a callable (n_tokens, n_features) -> "
            f"Constraints, got {type(constraints).__name__}"
        )

    def constraints_for(n_tokens: int, n_features: int) -> Constraints:
        try:
            result = constraints(n_tokens, n_features)
        except Exception as error:  # noqa: BLE001 - a usage error, raised through hypothesis as is
            raise AllocationError(
                f"constraints({n_tokens}, {n_features}) raised {type(error).__name__}: {error}") from error
        if not isinstance(result, Constraints):
            raise AllocationError(
                f"constraints({n_tokens}, {n_features}) returned {type(result).__name__}, "
                "expected an allocation.Constraints")
        try:
            result.resolve(n_tokens, n_features)
        except AllocationError as error:
            raise AllocationError(f"constraints({n_tokens}, {n_features}) do not fit that shape: {error}") \
                from error
        return result

    return constraints_for
