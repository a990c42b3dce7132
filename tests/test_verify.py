"""verify(rule, constraints): correct rules verify, wrong rules are refuted with a tiny counterexample.

Every counterexample is re-checked here independently: the exact optimum of the reported scores
(allocation.solve) must beat the rule's objective, or the rule's mask must break a cap.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import allocation
from allocation import Constraints, VerificationReport, solve, verify
from allocation.errors import AllocationError
from allocation.testing import assert_optimal

FAST = {"examples": 60}  # every built-in rule is exact, so 60 examples per rule keep the suite quick


def greedy_global(scores: torch.Tensor, per_token: int = 1, per_feature: int = 1) -> torch.Tensor:
    """Take entries from the largest down while their row and column have room: not optimal."""
    values = scores.numpy()
    n_tokens, n_features = values.shape
    mask = np.zeros(values.shape, dtype=bool)
    for index in np.argsort(-values, axis=None, kind="stable"):
        i, j = divmod(int(index), n_features)
        if values[i, j] > 0 and mask[i].sum() < per_token and mask[:, j].sum() < per_feature:
            mask[i, j] = True
    return torch.from_numpy(mask)


def rule_objective(report: VerificationReport) -> float:
    scores = report.scores.to(torch.float64).numpy()
    return float(scores[report.rule_mask.numpy()].sum())


# --- correct rules verify ---------------------------------------------------------------------

CORRECT = {
    "topk": (lambda s: allocation.topk(s, 2), Constraints.topk(2)),
    "topk_activations": (lambda s: allocation.topk_activations(s, 3), Constraints.topk(3)),
    "feature_choice": (lambda s: allocation.feature_choice(s, 2), Constraints.feature_choice(2)),
    "mutual_choice": (lambda s: allocation.mutual_choice(s, 5), Constraints.mutual_choice(5)),
    "allocate_token_caps_and_budget": (
        lambda s: allocation.allocate(s, Constraints(per_token=2, total=5)),
        Constraints(per_token=2, total=5)),
    "allocate_token_and_feature_caps": (  # the exact torch solver: no greedy rule is exact here
        lambda s: allocation.allocate(s, Constraints(per_token=2, per_feature=1)),
        Constraints(per_token=2, per_feature=1)),
    "allocate_feature_caps_and_budget": (
        lambda s: allocation.allocate(s, Constraints(per_feature=1, total=3)),
        Constraints(per_feature=1, total=3)),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_builtin_rule_verifies_against_its_own_constraints(name):
    rule, constraints = CORRECT[name]
    report = verify(rule, constraints, **FAST)
    assert report.ok, str(report)
    assert bool(report) is True
    assert report.examples_run == FAST["examples"]
    assert report.check is None and report.scores is None
    assert "VERIFIED" in str(report)


def test_shape_dependent_constraints_as_a_callable():
    """Zipf-shaped feature capacities m_j ~ n / (j + 1), plus a budget of n: caps follow the shape."""

    def zipf(n_tokens: int, n_features: int) -> Constraints:
        caps = np.maximum(1, n_tokens // (np.arange(n_features) + 1))
        return Constraints(per_feature=caps, total=n_tokens)

    def rule(scores):
        return allocation.allocate(scores, zipf(*scores.shape))

    assert verify(rule, zipf, **FAST).ok


def test_float64_scores_verify_with_the_tighter_tolerance_and_with_none_at_all():
    """Objectives are correctly rounded sums, so optimal masks that differ on ties score the same."""
    for tolerance in (None, 0.0):
        report = verify(lambda s: allocation.mutual_choice(s, 4), Constraints.mutual_choice(4),
                        dtype=torch.float64, tolerance=tolerance, **FAST)
        assert report.ok, str(report)


# --- wrong rules are refuted, with a minimal counterexample -----------------------------------


def test_greedy_under_token_and_feature_caps_is_refuted_on_a_2x2_matrix():
    report = verify(greedy_global, Constraints(per_token=1, per_feature=1))
    assert not report.ok and bool(report) is False
    assert report.check.startswith("optimality"), report.check
    assert tuple(report.scores.shape) == (2, 2), str(report)
    exact = solve(report.scores.numpy(), Constraints(per_token=1, per_feature=1))
    assert report.optimal_objective == pytest.approx(exact.objective)
    assert rule_objective(report) == pytest.approx(report.rule_objective)
    assert exact.objective > report.rule_objective  # a real counterexample, checked independently
    text = str(report)
    assert "REFUTED" in text and "scores as a literal: [[" in text and " R" in text and " O" in text


def test_per_row_topk_is_refuted_under_a_feature_choice_constraint():
    """Refuted either way it goes wrong: two tokens in one feature (feasibility), or one token
    with two good features (optimality); both on a matrix of 2 entries."""
    report = verify(lambda s: allocation.topk(s, 1), Constraints.feature_choice(1))
    assert not report.ok
    assert report.scores.numel() <= 2, str(report)
    column_counts = report.rule_mask.sum(dim=0)
    if report.check.startswith("feasibility"):
        assert report.check.startswith("feasibility: per_feature cap exceeded"), report.check
        assert int(column_counts.max()) > 1
    else:
        assert report.check.startswith("optimality"), report.check
        assert solve(report.scores.numpy(), Constraints.feature_choice(1)).objective > report.rule_objective


def test_one_entry_too_many_breaks_the_token_cap_on_a_1x3_matrix():
    report = verify(lambda s: allocation.topk(s, 3), Constraints.topk(2))
    assert not report.ok
    assert report.check.startswith("feasibility: per_token cap exceeded at token 0 (3 > 2)"), report.check
    assert tuple(report.scores.shape) == (1, 3)
    assert int(report.rule_mask.sum()) == 3


def test_one_entry_too_many_breaks_the_budget():
    report = verify(lambda s: allocation.mutual_choice(s, 4), Constraints.mutual_choice(3))
    assert not report.ok
    assert report.check == "feasibility: total budget exceeded (4 > 3)", report.check
    assert int(report.rule_mask.sum()) == 4 and report.scores.numel() <= 6, str(report)


def test_selecting_a_negative_score_is_refuted_on_a_1x1_matrix():
    report = verify(lambda s: allocation.topk(s.abs(), 1), Constraints.topk(1))
    assert not report.ok
    assert report.check.startswith("feasibility: selected the non-positive score"), report.check
    assert tuple(report.scores.shape) == (1, 1) and report.scores.item() < 0


def test_a_small_objective_loss_within_float32_rounding_is_not_a_failure():
    """A rule that drops an entry worth less than the tolerance still verifies; a rule that drops
    one worth more does not: the tolerance is 8 eps(float32) (1 + sum |S|)."""

    def lossy(scores, lost):
        mask = allocation.topk(scores, 2)
        return mask & ~((scores > 0) & (scores <= lost))

    assert verify(lambda s: lossy(s, 0.0), Constraints.topk(2), **FAST).ok
    assert not verify(lambda s: lossy(s, 1.0), Constraints.topk(2), **FAST).ok


# --- a broken rule is reported, never crashes verify ------------------------------------------

BROKEN = {
    "raises": (lambda s: 1 / 0, "error: rule raised ZeroDivisionError: division by zero"),
    "wrong_shape": (lambda s: torch.ones(s.shape[1], s.shape[0] + 1, dtype=torch.bool),
                    "output: rule returned shape"),
    "wrong_dtype": (lambda s: torch.zeros(s.shape, dtype=torch.complex64), "output: rule returned dtype"),
    "nan": (lambda s: torch.full_like(s, float("nan")), "output: rule returned nan at token 0, feature 0"),
    "not_a_tensor": (lambda s: s.numpy() > 0, "output: rule returned ndarray, expected a torch.Tensor"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_rule_is_reported_clearly(name):
    rule, expected = BROKEN[name]
    report = verify(rule, Constraints.topk(1), **FAST)
    assert not report.ok
    assert report.check.startswith(expected), report.check
    assert report.rule_mask is None and report.rule_objective is None
    assert tuple(report.scores.shape) == (1, 1)  # fails on every input: shrunk to the smallest
    assert "n/a" in str(report)  # no rule objective to print, but the report still prints


def test_integer_activations_are_accepted():
    report = verify(lambda s: allocation.topk(s, 1).to(torch.int64) * 7, Constraints.topk(1), **FAST)
    assert report.ok, str(report)


def test_a_nondeterministic_rule_is_reported_not_raised():
    calls = {"n": 0}

    def flaky(scores):
        calls["n"] += 1
        mask = allocation.topk(scores, 1)
        return mask | (scores > 0) if calls["n"] % 2 == 0 else mask

    report = verify(flaky, Constraints.topk(1), **FAST)
    assert not report.ok
    assert "cap exceeded" in report.check


# --- the search itself ------------------------------------------------------------------------


def test_same_seed_same_counterexample_and_shapes_stay_in_range():
    def too_many(scores):
        return allocation.topk(scores, 3)

    first = verify(too_many, Constraints.topk(2), seed=3, min_features=5, max_features=6)
    again = verify(too_many, Constraints.topk(2), seed=3, min_features=5, max_features=6)
    assert not first.ok and first.rule_name.endswith("too_many")
    assert torch.equal(first.scores, again.scores) and first.check == again.check
    assert first.examples_run == again.examples_run
    assert first.scores.shape[1] == 5  # shrinking never leaves the requested range


def test_bad_arguments_raise_allocation_error():
    rule = lambda s: allocation.topk(s, 1)  # noqa: E731
    with pytest.raises(AllocationError, match="examples"):
        verify(rule, Constraints.topk(1), examples=0)
    with pytest.raises(AllocationError, match="constraints must be"):
        verify(rule, {"per_token": 1})
    with pytest.raises(AllocationError, match="min_features=max_features=3"):
        verify(rule, Constraints.feature_choice([1, 2, 3]))
    with pytest.raises(AllocationError, match="min_tokens"):
        verify(rule, Constraints.topk(1), min_tokens=4, max_tokens=2)
    with pytest.raises(AllocationError, match=r"constraints\(1, 1\) raised"):
        verify(rule, lambda n, f: 1 / 0)
    with pytest.raises(AllocationError, match="callable"):
        verify(42, Constraints.topk(1))


def test_vector_caps_work_when_the_shape_is_fixed():
    caps = [2, 0, 1]
    report = verify(lambda s: allocation.feature_choice(s, caps), Constraints.feature_choice(caps),
                    min_features=3, max_features=3, **FAST)
    assert report.ok, str(report)


def test_assert_optimal_raises_with_the_report():
    assert assert_optimal(lambda s: allocation.topk(s, 1), Constraints.topk(1), **FAST).ok
    with pytest.raises(AssertionError, match="REFUTED") as caught:
        assert_optimal(lambda s: allocation.topk(s, 2), Constraints.topk(1))
    assert "scores as a literal" in str(caught.value)


@pytest.mark.gpu
def test_rules_on_the_gpu_verify_and_a_cpu_answer_is_a_device_failure():
    report = verify(lambda s: allocation.topk(s, 2), Constraints.topk(2), device="cuda", **FAST)
    assert report.ok, str(report)
    report = verify(lambda s: allocation.topk(s.cpu(), 2), Constraints.topk(2), device="cuda", **FAST)
    assert not report.ok and "cpu" in report.check and "cuda" in report.check
