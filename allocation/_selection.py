"""Exact greedy selection: the ``count`` largest positive scores per row, per column or overall.

Two implementations reach the same objective (masks may differ only among tied scores):

- ``select_top_plain``: ``torch.topk`` over each slice. Fast per row; slow per column (strided
  reads) and over the whole matrix (a top-B of n*F values).
- ``select_top_blocked``: a threshold from block maxima, then exact selection among the few
  candidates at or above it (Feature Choice: per column; Mutual Choice: over the whole matrix).

The blocked path rests on one fact. Cut a column (or the matrix) into disjoint blocks; if T is the
q-th largest block maximum then at least q entries are >= T, because each of those q blocks holds
its maximum. With q = count, the top-count entries are all >= T, and they lie in blocks whose
maximum is >= T ("candidate blocks"). Reading only those blocks again, then taking the exact top
count among their entries >= T, is exact for every input; its cost is one pass of block maxima
plus a small gather. When the candidate blocks are not few (heavy ties, budgets close to n*F,
very skewed counts) it returns None and the caller uses the plain path.

Ties are broken by position among the gathered entries (for a column: the lowest row first), so
exactly min(count, #positive) entries are selected per slice.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

Count = Union[int, Tensor]

BLOCKED_MIN_NUMEL = 1 << 20
"""Per-column selection on matrices with fewer entries uses the plain path (tests lower it to
exercise the blocked path)."""

BLOCKED_MIN_NUMEL_OVERALL = 1 << 16
"""The same for a selection over the whole matrix, where ``flatten().topk`` is slow much earlier
(512 x 1536, a training batch: 24 ms plain vs 7 ms blocked on one CPU thread)."""


def blocked_pays(numel: int, dim: Optional[int]) -> bool:
    """Whether ``select_top`` should try the blocked path for a matrix of ``numel`` entries."""
    if dim == 1:
        return False
    return numel >= (BLOCKED_MIN_NUMEL_OVERALL if dim is None else BLOCKED_MIN_NUMEL)

ROWS_PER_BLOCK = 8
"""Rows per fine block: a fine block is ROWS_PER_BLOCK consecutive rows of one column."""

SCRATCH_MAX_BYTES = 256 << 20
"""Largest block-maxima buffer a thread keeps for reuse on CPU (per dtype); see ``_scratch``."""

TYPICAL_COUNT_QUANTILE = 0.9
"""Feature Choice sizes its coarse blocks for this quantile of the per-column counts."""

WIDE_COLUMN_MIN, WIDE_COLUMN_FACTOR = 64, 8.0
"""A column with more candidates than WIDE_COLUMN_MIN and than WIDE_COLUMN_FACTOR times the mean is
padded apart from the others (see _top_per_column)."""

MAX_GATHER_FRACTION = 0.25
"""The blocked path gives up (returns None) when it would gather more than this fraction of S."""


def select_top_plain(scores: Tensor, count: Count, dim: Optional[int]) -> Tensor:
    """``count`` largest positive scores per slice along ``dim`` (None = all), by ``torch.topk``."""
    if dim is None:
        flat = scores.reshape(-1)
        kept = min(int(count), flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if kept > 0:
            values, index = flat.topk(kept, sorted=False)
            mask[index] = values > 0
        return mask.view_as(scores)
    size = scores.shape[dim]
    if isinstance(count, Tensor):
        largest = min(int(count.max()), size) if count.numel() else 0
    else:
        largest = min(int(count), size)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if largest == 0:
        return mask
    uniform = not isinstance(count, Tensor)
    values, index = scores.topk(largest, dim=dim, sorted=not uniform)
    keep = values > 0
    if not uniform:  # the j-th largest of a slice is kept iff j < that slice's count
        rank = torch.arange(largest, device=scores.device)
        rank = rank[None, :] if dim == 1 else rank[:, None]
        slice_count = count.to(scores.device)[:, None] if dim == 1 else count.to(scores.device)[None, :]
        keep &= rank < slice_count
    return mask.scatter_(dim, index, keep)


def select_top_blocked(scores: Tensor, count: Count, dim: Optional[int]) -> Optional[Tensor]:
    """Same selection as ``select_top_plain`` for dim 0 or None via block maxima; None if not worth it."""
    scores = scores.detach().contiguous()
    if dim is None:
        return top_overall_blocked(scores, int(count))
    if dim == 0:
        return top_per_column_blocked(scores, count_vector(count, scores.shape[1], scores.device))
    return None


def top_overall_blocked(scores: Tensor, total: int) -> Optional[Tensor]:
    """Mutual Choice: max <S, M> s.t. sum(M) <= total, via the total-th largest block maximum."""
    found = top_overall_frontier(scores, total, priced=False)
    return None if found is None else found[0]


def top_overall_frontier(scores: Tensor, total: int, reach: Optional[Tensor] = None, priced: bool = True
                         ) -> Optional[tuple[Tensor, Optional["ColumnFrontier"]]]:
    """``top_overall_blocked``'s mask and the candidates it chose from (None where it chose from none).

    ``priced``: the threshold is for total + 1 entries, so that the candidates reach one entry past
    the chosen ones (one floor for every column); else for total (the mask alone, no frontier).
    ``reach`` (a scalar): the floor is lowered to it where that costs few more blocks
    (``_reach_down``), so that counts above it come from the frontier too.
    """
    n_features = scores.shape[1]
    if total <= 0:
        return torch.zeros_like(scores, dtype=torch.bool), None
    if total >= scores.numel():
        return scores > 0, None
    fine = row_block_max(scores, ROWS_PER_BLOCK, reuse=True)  # (n_blocks, F)
    reaching_total = total + int(priced)
    if fine.numel() < reaching_total:
        return None
    wanted, reaching = _one(total, scores), _one(reaching_total, scores)
    coarse_rows = -(-2 * total // n_features)  # the coarse level keeps >= 2 * total maxima
    coarse = row_block_max(fine, max(1, fine.shape[0] // coarse_rows)).reshape(1, -1)
    threshold = _at_least_positive(kth_largest(coarse, reaching))
    blocks, columns = (fine >= threshold).nonzero().unbind(1)
    if blocks.numel() > reaching_total:  # refine: the reaching_total-th largest maximum among candidate blocks
        block_max = fine[blocks, columns]
        threshold = _at_least_positive(kth_largest(block_max[None], reaching))
        keep = (block_max >= threshold[0]).nonzero().squeeze(1)
        blocks, columns = blocks[keep], columns[keep]
    if reach is not None:
        reached, n_blocks = _reach_down(fine.reshape(-1, 1), threshold.reshape(1), reach.reshape(1))
        if bool(reached < threshold) and _gather_pays(n_blocks, scores):
            threshold = reached
            blocks, columns = (fine >= threshold).nonzero().unbind(1)
    if not _gather_pays(blocks.numel(), scores):
        return None
    index, values = _gather_cells(scores, blocks, columns)  # (cells, ROWS_PER_BLOCK) flat ids, values
    candidate = (values >= threshold).reshape(-1).nonzero().squeeze(1)
    index, values = index.reshape(-1)[candidate], values.reshape(-1)[candidate]
    chosen = top_in_rows(values[None], wanted)[0]
    mask = _mask_from(scores, index[chosen])
    if not priced:
        return mask, None
    floor = _floor(threshold.reshape(1)).expand(n_features)
    return mask, ColumnFrontier(index, values, index % n_features, chosen, floor)


@dataclass(frozen=True)
class ColumnFrontier:
    """Every entry of each column j at or above ``floor[j]``, as a blocked selection found them.

    ``index`` (flat indices into the scores), ``values``, ``columns`` and ``chosen`` (kept by the
    selection) list the entries; ``floor`` (F,) is 0 for a column that lists all its positive
    entries. Per column (``top_per_column_frontier``) each column lists at least count_j + 1 entries
    or all its positive ones, so the largest entry it does not choose is its largest dropped score
    wherever that is positive; over the matrix (``top_overall_frontier``, one floor) the same holds
    of the matrix: the largest unchosen entry of all is its largest dropped score.
    """

    index: Tensor
    values: Tensor
    columns: Tensor
    chosen: Tensor
    floor: Tensor

    def largest_unchosen(self) -> Tensor:
        """max(0, max{S_ij : i not chosen}) per column j (F,): the largest dropped score, clipped at 0."""
        dropped = ~self.chosen
        return self.values.new_zeros(self.floor.shape).scatter_reduce_(
            0, self.columns[dropped], self.values[dropped], "amax")

    def count_above(self, threshold: Tensor) -> tuple[Tensor, Tensor]:
        """#{i : S_ij > threshold_j} per column (F,) float64, and where that is exact (threshold_j >= floor[j])."""
        above = (self.values > threshold[self.columns]).to(torch.float64)
        counts = torch.bincount(self.columns, weights=above, minlength=self.floor.numel())
        return counts, threshold >= self.floor


def top_per_column_blocked(scores: Tensor, counts: Tensor) -> Optional[Tensor]:
    """Feature Choice: max <S, M> s.t. M^T 1 <= counts, via per-column thresholds on block maxima."""
    found = top_per_column_frontier(scores, counts, priced=False)
    return None if found is None else found[0]


def top_per_column_frontier(scores: Tensor, counts: Tensor, reach: Optional[Tensor] = None, priced: bool = True
                            ) -> Optional[tuple[Tensor, Optional[ColumnFrontier]]]:
    """``top_per_column_blocked``'s mask and the candidates it chose from (None if all counts are 0).

    ``priced``: the thresholds are for counts[j] + 1 entries, so that the candidates reach one entry
    past the chosen ones: the frontier prices the selection (``ColumnFrontier``) without another
    pass; else for counts[j] (the mask alone, no frontier).
    ``reach`` (F,): a column's floor is lowered to reach[j] where that costs few more blocks
    (``_reach_down``), so that counts above reach[j] come from the frontier too.
    """
    n_features = scores.shape[1]
    if int(counts.max()) == 0:
        return torch.zeros_like(scores, dtype=torch.bool), None
    fine = row_block_max(scores, ROWS_PER_BLOCK, reuse=True)  # (n_blocks, F)
    threshold = _at_least_positive(_column_thresholds(fine, counts + int(priced)))  # >= that many entries >= T_j
    if reach is not None:
        reached, n_blocks = _reach_down(fine, threshold, reach)
        if _gather_pays(n_blocks, scores):
            threshold = reached
    blocks, columns = (fine >= threshold).nonzero().unbind(1)  # blocks that can hold a chosen entry
    if not _gather_pays(blocks.numel(), scores):
        return None
    floor = _floor(threshold)
    if blocks.numel() == 0:  # no positive entry anywhere
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return (torch.zeros(scores.shape, dtype=torch.bool, device=scores.device),
                ColumnFrontier(empty, scores.new_zeros(0), empty, empty.bool(), floor))
    index, values = _gather_cells(scores, blocks, columns)  # (cells, ROWS_PER_BLOCK), in memory order
    above = (values >= threshold[columns, None]).reshape(-1).nonzero().squeeze(1)  # the only candidates
    columns = columns[above // ROWS_PER_BLOCK]
    by_column = torch.argsort(columns, stable=True)  # grouped by column, ascending rows within
    entries, columns = above[by_column], columns[by_column]
    index, values = index.reshape(-1)[entries], values.reshape(-1)[entries]
    chosen = _top_per_column(values, columns, counts, n_features, 2 * MAX_GATHER_FRACTION * scores.numel())
    if chosen is None:
        return None
    mask = _mask_from(scores, index[chosen])
    return mask, (ColumnFrontier(index, values, columns, chosen, floor) if priced else None)


REACH_BLOCKS_FACTOR = 2
"""``_reach_down`` lowers a column's threshold when its candidate blocks at most double (plus 2)."""


def _reach_down(fine: Tensor, threshold: Tensor, reach: Tensor) -> tuple[Tensor, int]:
    """Per column of block maxima ``fine``, min(threshold_j, reach_j) (at least positive) where that
    takes at most REACH_BLOCKS_FACTOR times the column's candidate blocks plus 2, threshold_j elsewhere
    (a low reach would gather the whole column); and the number of candidate blocks it leaves."""
    lowered = _at_least_positive(torch.minimum(threshold, reach.to(device=fine.device, dtype=fine.dtype)))
    own = (fine >= threshold).sum(dim=0, dtype=torch.int32)
    wider = (fine >= lowered).sum(dim=0, dtype=torch.int32)
    take = wider <= REACH_BLOCKS_FACTOR * own + 2
    return torch.where(take, lowered, threshold), int(torch.where(take, wider, own).sum())


def kth_largest(values: Tensor, counts: Tensor) -> Tensor:
    """The counts[r]-th largest value of row r of a (R, L) tensor, as (R, 1); counts clamped to [1, L]."""
    length = values.shape[1]
    counts = counts.clamp(1, length)
    most = int(counts.max())
    if 4 * most > length and bool((counts == most).all()):  # deep in the row: selection beats topk
        return values.kthvalue(length - most + 1, dim=1, keepdim=True).values
    return values.topk(most, dim=1).values.gather(1, (counts - 1)[:, None])


def top_in_rows(values: Tensor, counts: Tensor) -> Tensor:
    """Per row r, the counts[r] largest positive values: a (R, L) bool; ties go to the lowest positions.

    With kth the counts[r]-th largest value of row r, every value > kth is chosen and the first
    (counts[r] - #{> kth}) values == kth fill the rest, so exactly counts[r] are chosen; then the
    non-positive ones are dropped, leaving min(counts[r], #positive) (if kth <= 0, every positive
    value is > kth).
    """
    counts = counts.clamp(max=values.shape[1])
    if values.numel() == 0 or int(counts.max()) == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    kth = kth_largest(values, counts)
    chosen = values >= kth
    excess = chosen.count_nonzero(1) > counts  # rows with more ties at kth than places left
    if bool(excess.any()):
        rows = excess.nonzero().squeeze(1)
        tied = values[rows] == kth[rows]
        still_needed = counts[rows, None] - (values[rows] > kth[rows]).sum(1, keepdim=True)
        chosen[rows] &= ~tied | (tied.cumsum(1) <= still_needed)
    if bool((kth <= 0).any()):
        chosen &= values > 0
    if bool((counts == 0).any()):
        chosen &= (counts > 0)[:, None]
    return chosen


def row_block_max(matrix: Tensor, rows_per_block: int, reuse: bool = False) -> Tensor:
    """Maxima of consecutive row blocks: (R, C) -> (ceil(R / rows_per_block), C); the last may be short.

    ``reuse``: write into this thread's scratch buffer (valid until the next reusing call).
    """
    n_rows, n_cols = matrix.shape
    full = n_rows // rows_per_block
    shape = (-(-n_rows // rows_per_block), n_cols)
    out = _scratch(shape, matrix) if reuse else matrix.new_empty(shape)
    if full:
        body = matrix[: full * rows_per_block].reshape(full, rows_per_block, n_cols)
        torch.amax(body, dim=1, out=out[:full])
    if full * rows_per_block < n_rows:
        torch.amax(matrix[full * rows_per_block :], dim=0, keepdim=True, out=out[full:])
    return out


def _column_thresholds(fine: Tensor, counts: Tensor) -> Tensor:
    """T_j = counts[j]-th largest coarse block maximum of column j: >= counts[j] entries are >= T_j.

    The coarse level is sized for a typical count (the TYPICAL_COUNT_QUANTILE of the counts), not
    the largest, so one large Zipf capacity does not make every column's threshold expensive.
    Columns asking for more entries than there are coarse blocks get T = -inf (every positive entry
    is a candidate); columns asking for none get T = +inf (none is).
    """
    typical = int(counts.kthvalue(max(1, math.ceil(TYPICAL_COUNT_QUANTILE * counts.numel()))).values)
    factor = max(1, fine.shape[0] // max(8 * typical, 32))  # ~8 coarse blocks per wanted entry
    coarse = row_block_max(fine, factor).t().contiguous()  # (F, n_coarse)
    n_coarse = coarse.shape[1]
    threshold = kth_largest(coarse, counts).squeeze(1)
    inf = torch.tensor(float("inf"), dtype=fine.dtype, device=fine.device)
    threshold = torch.where(counts > n_coarse, -inf, threshold)
    return torch.where(counts == 0, inf, threshold)


def _top_per_column(values: Tensor, columns: Tensor, counts: Tensor, n_features: int,
                    max_padded: float) -> Optional[Tensor]:
    """The counts[j] largest of each column's candidates: a bool over the candidates, or None.

    ``values``/``columns`` are grouped by column (ascending rows within). Each column's candidates go
    to one row of a padded (columns, width) matrix for ``top_in_rows``; columns with many more
    candidates than the others (large Zipf capacities) form a second, wider matrix of their own, so
    that a few wide columns do not widen every row. None if a padded matrix would exceed
    ``max_padded`` entries.
    """
    per_column = torch.bincount(columns, minlength=n_features)
    slot = torch.arange(columns.numel(), device=columns.device) - (per_column.cumsum(0) - per_column)[columns]
    wide = per_column > max(WIDE_COLUMN_MIN, WIDE_COLUMN_FACTOR * columns.numel() / n_features)
    chosen = torch.zeros(columns.numel(), dtype=torch.bool, device=columns.device)
    for group in (~wide, wide):
        members = group.nonzero().squeeze(1)  # the group's columns, ascending
        if members.numel() == 0:
            continue
        width = int(per_column[members].max())
        if members.numel() * width > max_padded:
            return None
        row_of = torch.full((n_features,), -1, dtype=torch.long, device=columns.device)
        row_of[members] = torch.arange(members.numel(), device=columns.device)
        inside = group[columns].nonzero().squeeze(1)  # candidates of the group's columns
        rows, slots = row_of[columns[inside]], slot[inside]
        padded = values.new_full((members.numel(), width), float("-inf"))
        padded[rows, slots] = values[inside]  # row r: column members[r]'s candidates, ascending rows
        chosen[inside] = top_in_rows(padded, counts[members])[rows, slots]
    return chosen


def _gather_cells(scores: Tensor, blocks: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices and values of the fine blocks (blocks[c], columns[c]): two (cells, ROWS_PER_BLOCK).

    Rows past the matrix (a short last block) get value -inf, which is never chosen.
    """
    n_rows, n_features = scores.shape
    step = torch.arange(ROWS_PER_BLOCK, device=scores.device) * n_features
    index = (blocks * (ROWS_PER_BLOCK * n_features) + columns)[:, None] + step
    if n_rows % ROWS_PER_BLOCK == 0:
        return index, scores.reshape(-1).take(index)
    past_end = index >= scores.numel()
    values = scores.reshape(-1).take(index.clamp(max=scores.numel() - 1))
    return index, values.masked_fill(past_end, float("-inf"))


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int], like: Tensor) -> Tensor:
    """An uninitialised ``like.dtype`` tensor of ``shape``, reused across calls on CPU.

    Large CPU tensors are fresh memory mappings: first touch costs a page fault per 4 KiB, which
    was half of the block-maxima pass at 4096 x 32768 (67 MB: ~20 ms of ~40). Each thread keeps
    its largest buffer per dtype, at most SCRATCH_MAX_BYTES (larger requests get a fresh tensor);
    CUDA has its own caching allocator, so there it is a plain ``empty``.
    """
    numel = shape[0] * shape[1]
    if like.device.type != "cpu" or numel * like.element_size() > SCRATCH_MAX_BYTES:
        return like.new_empty(shape)
    buffers = _SCRATCH.__dict__.setdefault("by_dtype", {})
    held = buffers.get(like.dtype)
    if held is None or held.numel() < numel:
        held = buffers[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return held[:numel].view(shape)


def _mask_from(scores: Tensor, flat_index: Tensor) -> Tensor:
    """A bool mask of ``scores``' shape, True at the flat indices."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.view(-1)[flat_index] = True
    return mask


def _gather_pays(n_blocks: int, scores: Tensor) -> bool:
    """Whether gathering ``n_blocks`` fine blocks stays within MAX_GATHER_FRACTION of the scores."""
    return n_blocks * ROWS_PER_BLOCK <= MAX_GATHER_FRACTION * scores.numel()


def _floor(threshold: Tensor) -> Tensor:
    """A candidate threshold as a frontier's floor: 0 where it is the smallest positive number (every
    positive entry is a candidate)."""
    return torch.where(threshold == _at_least_positive(threshold.new_zeros(())), 0, threshold)


def _at_least_positive(threshold: Tensor) -> Tensor:
    """max(threshold, smallest positive number): ``x >= it`` keeps x >= threshold AND x > 0."""
    info = torch.finfo(threshold.dtype)
    return threshold.clamp(min=info.tiny * info.eps)  # tiny * eps = the smallest subnormal


def _one(total: int, scores: Tensor) -> Tensor:
    """A single count as the int64 vector ``top_in_rows`` takes."""
    return torch.tensor([total], dtype=torch.long, device=scores.device)


def count_vector(count: Count, length: int, device: torch.device) -> Tensor:
    """Per-slice counts as an int64 vector of ``length``."""
    if isinstance(count, Tensor):
        return count.to(device=device, dtype=torch.long).reshape(-1).expand(length)
    return torch.full((length,), int(count), dtype=torch.long, device=device)
