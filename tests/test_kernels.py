"""The blocked selection kernels are exact: same selected values as torch.topk and as the LP optimum.

Spec: for every score matrix (ties, zeros, negatives, heavy duplicates, half precision, n or F = 1)
and every count (0, above the slice size, above the number of positives), the blocked path of
``allocation._selection`` selects exactly min(count, #positive) entries per slice, only positive
ones, and the multiset of selected values equals the plain ``torch.topk`` path's (so the objective
is identical, not merely close). The size threshold and block shape are lowered so that hypothesis
exercises the blocked path on small matrices; a few realistic sizes check that it runs by default.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from allocation_checks import blocked_everywhere
from hypothesis import given, settings
from hypothesis import strategies as st

import allocation
from allocation import Constraints, _selection

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

VALUES = {
    "ties": st.integers(-3, 3).map(float),
    "binary": st.sampled_from([0.0, 1.0]),
    "reals": st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=16),
    "wide": st.sampled_from([-1e3, -1.0, -0.0, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e3]),
}


@st.composite
def score_tensors(draw, max_tokens: int = 33, max_features: int = 21) -> torch.Tensor:
    """(n, F) tensors of one value regime and one floating dtype (values exact in every dtype)."""
    n_tokens = draw(st.integers(1, max_tokens))
    n_features = draw(st.integers(1, max_features))
    regime = draw(st.sampled_from(sorted(VALUES)))
    values = draw(st.lists(VALUES[regime], min_size=n_tokens * n_features, max_size=n_tokens * n_features))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.tensor(values, dtype=torch.float64).reshape(n_tokens, n_features).to(dtype)


def selected_values(scores: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The selected scores, sorted: equal lists <=> equal objectives for the same scores."""
    return sorted(scores.double()[mask].tolist())


def positives(scores: torch.Tensor, dim) -> torch.Tensor:
    """Number of positive scores per column (dim 0) or overall (dim None)."""
    return (scores > 0).sum(0) if dim == 0 else (scores > 0).sum()


def assert_exact(scores: torch.Tensor, mask: torch.Tensor, count, dim) -> None:
    """Exactly min(count, #positive) positive entries per slice, and topk's selected values."""
    reference = _selection.select_top_plain(scores, count, dim)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert not bool((mask & (scores <= 0)).any()), "selected a non-positive score"
    if dim == 0:
        wanted = torch.minimum(torch.as_tensor(count).expand(scores.shape[1]), positives(scores, 0))
        assert torch.equal(mask.sum(0), wanted), "per-column count is not min(count, #positive)"
    else:
        assert int(mask.sum()) == min(int(count), int(positives(scores, None)))
    assert selected_values(scores, mask) == selected_values(scores, reference)


@given(score_tensors(), st.integers(0, 800), st.sampled_from([1, 2, 3, 8]))
def test_overall_blocked_is_exact(scores, total, rows_per_block):
    """Mutual Choice: top-total over the matrix; counts above #positives and n*F included."""
    with blocked_everywhere(rows_per_block):
        mask = _selection.top_overall_blocked(scores, total)
    if mask is None:  # only when there are fewer blocks than the budget
        assert -(-scores.shape[0] // rows_per_block) * scores.shape[1] < total < scores.numel()
        return
    assert_exact(scores, mask, total, None)


def assert_frontier_lists(scores: torch.Tensor, mask: torch.Tensor, frontier) -> torch.Tensor:
    """The frontier lists exactly the positive entries >= its floor, each once, with the selection's
    choices and every chosen entry; returns the listed entries as a mask."""
    listed = torch.zeros_like(mask)
    listed.view(-1)[frontier.index] = True
    assert torch.equal(listed, (scores >= frontier.floor) & (scores > 0))
    assert frontier.index.numel() == int(listed.sum())  # each entry listed once
    assert torch.equal(frontier.values, scores.reshape(-1)[frontier.index])
    assert torch.equal(frontier.columns, frontier.index % scores.shape[1])
    assert torch.equal(frontier.chosen, mask.reshape(-1)[frontier.index])
    assert int(frontier.chosen.sum()) == int(mask.sum())  # every chosen entry is listed
    return listed


@given(score_tensors(), st.sampled_from([1, 2, 3, 8]), st.data())
def test_overall_frontier_prices_the_selection_it_came_from(scores, rows_per_block, data):
    """Mutual Choice's frontier (one floor): at least total + 1 entries or all the positive ones, so
    its largest unchosen entry is the matrix's largest dropped score clipped at 0, and counts above a
    threshold at or above the floor are exact. A ``reach`` only lowers the floor, to the reach."""
    flat = scores.reshape(-1)
    total = data.draw(st.integers(0, flat.numel() + 1), label="total")
    reach = data.draw(st.sampled_from([None, flat[data.draw(st.integers(0, flat.numel() - 1), label="entry")],
                                       flat.new_zeros(())]), label="reach")
    with blocked_everywhere(rows_per_block):
        found = _selection.top_overall_frontier(scores, total, reach)
        unreached = _selection.top_overall_frontier(scores, total)
    if found is None:  # only when there are no more blocks than the budget
        assert -(-scores.shape[0] // rows_per_block) * scores.shape[1] <= total < scores.numel()
        return
    mask, frontier = found
    assert_exact(scores, mask, total, None)
    if frontier is None:
        assert total <= 0 or total >= scores.numel()
        return
    assert bool((frontier.floor == frontier.floor[0]).all())
    listed = assert_frontier_lists(scores, mask, frontier)
    assert int(listed.sum()) >= total + 1 or float(frontier.floor[0]) == 0
    dropped = torch.where(mask, float("-inf"), scores).max().clamp_min(0)
    assert torch.equal(frontier.largest_unchosen().max(), dropped)
    if reach is not None:
        floor, before = frontier.floor[0], unreached[1].floor[0]
        assert floor <= before and (floor == before or floor == reach.clamp_min(0))
    for value in (flat[data.draw(st.integers(0, flat.numel() - 1), label="threshold entry")], flat.new_zeros(())):
        threshold = value.expand(scores.shape[1])
        above, exact = frontier.count_above(threshold)
        assert torch.equal(exact, threshold >= frontier.floor)
        assert torch.equal(above[exact], (scores > threshold).sum(0).double()[exact])


@st.composite
def column_counts(draw, n_features: int):
    """A uniform count or one count per column, from 0 to beyond the column length."""
    if draw(st.booleans()):
        return draw(st.integers(0, 40))
    return torch.tensor(draw(st.lists(st.integers(0, 40), min_size=n_features, max_size=n_features)))


@given(st.data(), score_tensors(), st.sampled_from([1, 2, 3, 8]))
def test_per_column_blocked_is_exact(data, scores, rows_per_block):
    """Feature Choice: top-m_j of every column, uniform and per-column (Zipf-like) counts."""
    count = data.draw(column_counts(scores.shape[1]))
    with blocked_everywhere(rows_per_block):
        mask = _selection.select_top_blocked(scores, count, 0)
    assert mask is not None
    assert_exact(scores, mask, count, 0)


@given(st.data(), score_tensors(), st.sampled_from([1, 2, 3, 8]))
def test_per_column_frontier_prices_the_selection_it_came_from(data, scores, rows_per_block):
    """The frontier lists exactly the entries >= floor_j of each column j (positive ones), at least
    count_j + 1 of them or all the positive ones (floor 0), with the selection's choices; so its
    largest unchosen entry is the column's largest dropped score clipped at 0, and its counts above a
    threshold at or above the floor are exact (thresholds tied with the scores, and 0). A ``reach``
    lowers floors to it (where cheap) and changes none of this."""
    n_tokens, n_features = scores.shape
    count = data.draw(column_counts(n_features))
    counts = _selection.count_vector(count, n_features, scores.device)
    row = data.draw(st.integers(0, n_tokens - 1), label="threshold row")
    reach = data.draw(st.sampled_from([None, scores[row], scores[row].clamp_min(0) / 2]), label="reach")
    with blocked_everywhere(rows_per_block):
        found = _selection.top_per_column_frontier(scores, counts, reach)
        unreached = _selection.top_per_column_frontier(scores, counts)
    assert found is not None
    mask, frontier = found
    assert_exact(scores, mask, count, 0)
    if frontier is None:
        assert int(counts.max()) == 0
        return
    if reach is not None:  # a reach only ever lowers a floor, to the reach itself
        lowered = frontier.floor != unreached[1].floor
        assert bool((frontier.floor <= unreached[1].floor).all())
        assert torch.equal(frontier.floor[lowered], torch.where(reach[lowered] > 0, reach[lowered], 0))
    listed = assert_frontier_lists(scores, mask, frontier)
    assert bool(((listed.sum(0) >= counts.clamp(max=n_tokens) + 1) | (frontier.floor == 0)).all())
    dropped = torch.where(mask, float("-inf"), scores).amax(dim=0).clamp_min(0)
    assert torch.equal(frontier.largest_unchosen(), dropped)
    for threshold in (scores[row], scores[row].clamp_min(0), torch.zeros_like(scores[row])):
        above, exact = frontier.count_above(threshold)
        assert torch.equal(exact, threshold >= frontier.floor)
        assert torch.equal(above[exact], (scores > threshold).sum(0).double()[exact])


@settings(max_examples=40)
@given(score_tensors(max_tokens=12, max_features=10), st.data())
def test_rules_on_blocked_path_reach_the_lp_optimum(scores, data):
    """mutual_choice, feature_choice and allocate (caps + budget) equal allocation.solve's objective."""
    n_tokens, n_features = scores.shape
    total = data.draw(st.integers(0, n_tokens * n_features + 2))
    m = data.draw(st.integers(0, n_tokens + 2))
    cases = [
        (lambda s: allocation.mutual_choice(s, total), Constraints.mutual_choice(total)),
        (lambda s: allocation.feature_choice(s, m), Constraints.feature_choice(m)),
        (lambda s: allocation.allocate(s, Constraints(per_feature=m, total=total)),
         Constraints(per_feature=m, total=total)),
    ]
    exact_scores = scores.double().numpy()
    for rule, constraints in cases:
        with blocked_everywhere(rows_per_block=2):
            mask = rule(scores).numpy()
        optimum = allocation.solve(exact_scores, constraints)
        assert float(exact_scores[mask].sum()) == pytest.approx(optimum.objective, abs=1e-9 * (1 + np.abs(
            exact_scores).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_path_runs_by_default_at_training_sizes(dtype):
    """At 512 x 2048 (over the size threshold) the blocked path answers, and exactly."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(512, 2048, generator=generator).to(dtype)
    assert scores.numel() >= _selection.BLOCKED_MIN_NUMEL
    for count, dim in ((32 * 512, None), (8, 0), (torch.randint(0, 12, (2048,), generator=generator), 0)):
        mask = _selection.select_top_blocked(scores, count, dim)
        assert mask is not None, "the blocked path fell back on a typical input"
        assert_exact(scores, mask, count, dim)
        assert torch.equal(allocation.rules.select_top(scores, count, dim), mask)


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_zipf_capacities_stay_on_the_blocked_path(exponent):
    """Zipf-shaped capacities (the largest = a whole column) answer on the blocked path, exactly:
    the wide columns are padded apart instead of widening every column's row."""
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(512, 2048, generator=generator)
    weights = torch.arange(1, 2049, dtype=torch.float64) ** -exponent
    counts = (weights / weights.sum() * 16 * 512).floor().long().clamp(1, 512)
    assert int(counts.max()) > _selection.WIDE_COLUMN_MIN and int(counts.min()) <= 2
    mask = _selection.select_top_blocked(scores, counts, 0)
    assert mask is not None, "the blocked path fell back on Zipf capacities"
    assert_exact(scores, mask, counts, 0)


def test_degenerate_inputs_fall_back_and_stay_exact():
    """All-equal scores (every entry tied) and budgets near n*F still give the exact count."""
    tied = torch.ones(1024, 1024)
    assert_exact(tied, allocation.rules.select_top(tied, 5000, None), 5000, None)
    assert_exact(tied, allocation.rules.select_top(tied, 7, 0), 7, 0)
    dense = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))
    assert_exact(dense, allocation.rules.select_top(dense, 700_000, None), 700_000, None)


def test_non_contiguous_and_grad_inputs():
    """A transposed view and a tensor that requires grad select the same as a plain copy."""
    base = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    view = base.t()
    with blocked_everywhere():
        for dim, count in ((None, 900), (0, 4)):
            assert_exact(view, _selection.select_top_blocked(view, count, dim), count, dim)
            leaf = view.detach().clone().requires_grad_(True)
            assert_exact(view, _selection.select_top_blocked(leaf, count, dim), count, dim)


@pytest.mark.parametrize("max_bytes", [_selection.SCRATCH_MAX_BYTES, 4096], ids=["reused", "over-the-cap"])
def test_scratch_buffer_is_private_to_each_thread_and_call(monkeypatch, max_bytes):
    """The reused block-maxima buffer never leaks between calls: threads running the blocked path at
    once, on different sizes and dtypes (shrinking and growing the buffer), stay exact; so do
    requests over the cap (a fresh tensor each)."""
    monkeypatch.setattr(_selection, "SCRATCH_MAX_BYTES", max_bytes)
    generator = torch.Generator().manual_seed(4)
    problems = [(torch.randn(n, f, generator=generator).to(dtype), count, dim)
                for n, f, dtype in ((700, 300, torch.float32), (64, 500, torch.float32), (333, 90, torch.bfloat16))
                for count, dim in ((3 * n, None), (5, 0))]
    expected = [_selection.select_top_plain(*problem) for problem in problems]
    errors = []

    def worker(order):
        try:
            for index in order * 3:
                mask = _selection.select_top_blocked(*problems[index])
                scores = problems[index][0]
                assert mask is not None
                assert selected_values(scores, mask) == selected_values(scores, expected[index])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    orders = [list(range(len(problems))), list(reversed(range(len(problems))))]
    with blocked_everywhere():
        threads = [threading.Thread(target=worker, args=(order,)) for order in orders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


def test_top_in_rows_breaks_ties_by_position():
    """Among tied values at the boundary, the lowest positions are chosen."""
    values = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.0], [0.0, -1.0, 3.0, 3.0, 3.0]])
    chosen = _selection.top_in_rows(values, torch.tensor([3, 2]))
    assert chosen.tolist() == [[True, True, True, False, False], [False, False, True, True, False]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_path_on_cuda(dtype):
    """The same exactness on a CUDA device."""
    scores = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    for count, dim in ((64 * 1024, None), (16, 0)):
        mask = _selection.select_top_blocked(scores, count, dim)
        assert mask is not None and mask.device == scores.device
        assert_exact(scores.cpu(), mask.cpu(), count, dim)
