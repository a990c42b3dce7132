"""Exact allocation of one batch split across torch.distributed ranks, for any ``Constraints``.

Rank r holds rows [offset_r, offset_r + n_r) of the global (n, F) score matrix S (a ``Shard``); the
constraints are the global batch's. ``global_allocate`` returns rank r's rows of an optimal mask of
allocate(S, constraints), never gathering S unless the caps are mixed:

    per-token caps k_i (TopK)     local: no communication
    per-feature caps m_j (FC)     all-gather of each rank's per-feature top-min(m_j, n_max) values
    total budget B (MC)           radix select of the B-th largest positive score over the ranks' local
                                  top-B candidates: one all-reduced 256-bin histogram per byte of the key
    token AND feature caps        S gathered and solved on every rank, up to GATHER_MAX_ENTRIES; refused above

Laminar mixes compose as in ``allocation.rules.allocate``: token or feature caps first, then the
budget over what they kept. Ties at a threshold go to the lowest global token index, then the
lowest feature, so exactly the cap is selected (objectives equal the single-process rule's; masks
too when the scores have no tie at a threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .constraints import Constraints
from .errors import AllocationError
from .rules import _as_count, allocate_unchecked, select_top

GATHER_MAX_ENTRIES = 1 << 22
"""Mixed caps (token AND feature) gather the whole (n, F) matrix: refused above this many entries."""

RADIX_BITS = 8
"""Bits of the score key resolved per all-reduce of the budget's radix select (2^8-bin histograms)."""


class RankFailedError(AllocationError):
    """A collective with the other ranks failed: a rank died, or did not answer within the timeout."""


class Communicator:
    """The collectives global allocation uses, on a process group, counting the bytes this rank sends."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout: Optional[timedelta] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise AllocationError("global allocation needs torch.distributed initialised "
                                  "(launch with torchrun, or call torch.distributed.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.bytes_sent = 0
        self.calls = 0

    def _run(self, what: str, operation, tensor: Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1
        try:
            operation()
        except (RuntimeError, dist.DistError) as error:  # DistBackendError, timeouts, a peer's closed socket
            raise self.failure(what, error) from None

    def failure(self, what: str, error: BaseException) -> RankFailedError:
        """The error to raise when a collective (``what``) failed with ``error``."""
        wait = f" (timeout {self.timeout.total_seconds():g} s)" if self.timeout is not None else ""
        first = str(error).splitlines()[0] if str(error) else repr(error)
        return RankFailedError(
            f"rank {self.rank} of {self.world_size}: the {what} with the other ranks failed{wait}; a rank died "
            f"or stalled (see its log). {first}"
        )

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """``tensor`` reduced over the ranks in place ('sum', 'min' or 'max'); returns it."""
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        self._run(f"all-reduce ({op})", lambda: dist.all_reduce(tensor, op=reduce_op, group=self.group), tensor)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on all), stacked: (world_size, *shape)."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.world_size, *tensor.shape))
        parts = list(out.unbind(0))
        self._run("all-gather", lambda: dist.all_gather(parts, tensor, group=self.group), tensor)
        return out

    def barrier(self) -> None:
        """Wait for every rank (an all-reduce of one number: it fails, like the others, when a rank died)."""
        self.all_reduce(torch.zeros(1, device=self.device))


@dataclass(frozen=True)
class Shard:
    """This rank's rows of the global batch: [offset, offset + n_local) of n_global."""

    offset: int
    n_local: int
    n_global: int
    sizes: tuple  # every rank's n_local, in rank order

    @property
    def n_max(self) -> int:
        return max(self.sizes)

    @classmethod
    def equal(cls, n_global: int, rank: int, world_size: int) -> "Shard":
        """Equal contiguous shards of n_global rows (n_global divisible by world_size)."""
        if n_global % world_size:
            raise AllocationError(f"a global batch of {n_global} tokens does not split evenly over {world_size} "
                                  f"ranks; choose a --batch-size divisible by {world_size}")
        size = n_global // world_size
        return cls(rank * size, size, n_global, (size,) * world_size)


def shard_of(n_local: int, comm: Communicator) -> Shard:
    """The shard layout from every rank's row count (one all-gather of an int)."""
    sizes = comm.all_gather(torch.tensor([n_local], dtype=torch.int64, device=comm.device)).reshape(-1).tolist()
    return Shard(int(sum(sizes[: comm.rank])), n_local, int(sum(sizes)), tuple(int(s) for s in sizes))


def global_allocate(scores: Tensor, constraints: Constraints, comm: Communicator, shard: Optional[Shard] = None,
                    *, gather_max_entries: int = GATHER_MAX_ENTRIES) -> Tensor:
    """This rank's rows of an optimal mask of allocate(S, constraints), S the rows of every rank stacked.

    ``constraints``: the global batch's caps. ``shard``: this rank's rows (found by one all-gather when
    absent). Mixed token and feature caps gather S (AllocationError above ``gather_max_entries``).
    """
    if not isinstance(constraints, Constraints):
        raise AllocationError(f"constraints must be an allocation.Constraints, got {type(constraints).__name__}")
    shard = shard_of(scores.shape[0], comm) if shard is None else shard
    if scores.shape[0] != shard.n_local:
        raise AllocationError(f"scores have {scores.shape[0]} rows but the shard has n_local={shard.n_local}")
    if not constraints.greedy_exact:
        return gathered_allocate(scores, constraints, comm, shard, gather_max_entries=gather_max_entries)
    caps = constraints.resolve(shard.n_global, scores.shape[1])
    mask = None
    if caps.per_token is not None:
        rows = caps.per_token[shard.offset: shard.offset + shard.n_local]
        mask = select_top(scores, _as_count(rows), dim=1) if rows.size else scores.new_zeros(scores.shape, dtype=bool)
    if caps.per_feature is not None:
        mask = global_feature_choice(scores, caps.per_feature, comm, shard)
    if caps.total is not None:
        candidates = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
        mask = global_mutual_choice(candidates, caps.total, comm, shard)
    return scores > 0 if mask is None else mask


def gathered_allocate(scores: Tensor, constraints: Constraints, comm: Communicator, shard: Shard, *,
                      gather_max_entries: int = GATHER_MAX_ENTRIES, solve=None):
    """Mixed caps: gather S on every rank, solve it there (``solve``, default ``allocate``), keep our rows.

    ``solve(S, constraints)`` may return a mask or an object with ``.mask``; what it returns for the
    whole batch is returned with this rank's rows of the mask in place of the full one.
    """
    entries = shard.n_global * scores.shape[1]
    if entries > gather_max_entries:
        raise AllocationError(
            f"{constraints} caps tokens together with features or a budget (solved by the auction): no "
            f"per-rank split of these caps is exact, so global allocation gathers the whole batch, "
            f"{shard.n_global} x {scores.shape[1]} = {entries} scores, above gather_max_entries={gather_max_entries}. "
            "Use --allocation-scope local (each rank solves its own tokens), a smaller batch, or a rule "
            "with one family of caps (topk, feature-choice, mutual-choice)"
        )
    padded = scores.new_full((shard.n_max, scores.shape[1]), float("-inf"))
    padded[: shard.n_local] = scores.detach()
    parts = comm.all_gather(padded)
    full = torch.cat([parts[r, :size] for r, size in enumerate(shard.sizes)])
    solution = (solve or allocate_unchecked)(full, constraints)
    rows = slice(shard.offset, shard.offset + shard.n_local)
    if isinstance(solution, Tensor):
        return solution[rows]
    return solution, solution.mask[rows]


# ------------------------------------------------------------------------------------ a total budget


def global_mutual_choice(scores: Tensor, total: int, comm: Communicator, shard: Shard) -> Tensor:
    """max <S, M> s.t. 1^T M 1 <= total over every rank's rows: the total largest positive scores.

    The total-th largest positive score t is in the union of the ranks' local top-total candidates;
    its key (the score's bits, ordered as the positive floats) is found RADIX_BITS at a time from
    all-reduced histograms of the candidates' keys. Candidates > t are kept; the rest of the budget
    goes to the entries == t in global (token, feature) order.
    """
    if total <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    local = select_top(scores, total, dim=None)  # this rank's top-min(total, #positive): holds its share
    index = local.reshape(-1).nonzero().squeeze(1)  # ascending flat index: (token, feature) order
    values = scores.reshape(-1)[index]
    full = index.numel() >= total  # this rank may hold more positives than it kept
    sizes = comm.all_reduce(torch.tensor([index.numel(), int(full)], dtype=torch.int64, device=scores.device))
    if int(sizes[1]) == 0 and int(sizes[0]) <= total:  # every positive score of the batch fits: keep them
        return local
    keys = _positive_keys(values)
    bins = 1 << RADIX_BITS
    needed, above, key, inside = total, 0, 0, keys
    for shift in range(8 * scores.element_size() - RADIX_BITS, -1, -RADIX_BITS):
        digits = (inside >> shift) & (bins - 1)
        histogram = comm.all_reduce(torch.bincount(digits, minlength=bins).to(torch.int32))  # counts < 2^31
        from_top = histogram.flip(0).cumsum(0)  # candidates whose digit is >= bins - 1 - i
        index_of = int((from_top < needed).sum())  # the first i with from_top[i] >= needed
        above_here = int(from_top[index_of - 1]) if index_of > 0 else 0
        above, needed = above + above_here, needed - above_here
        digit = bins - 1 - index_of
        key = (key << RADIX_BITS) | digit
        inside = inside[digits == digit]
    threshold = _key_value(key, scores.dtype)
    kept = index[values > threshold]
    if full and bool((values == threshold).any()):  # ties at our cut may lie outside our candidates
        tied = (scores.reshape(-1) == threshold).nonzero().squeeze(1)
    else:
        tied = index[values == threshold]
    return _mask_from(scores, torch.cat([kept, _first_ties(tied, total - above, comm)]))


def _first_ties(tied: Tensor, wanted: int, comm: Communicator) -> Tensor:
    """This rank's part of the first ``wanted`` tied entries of the batch in (rank, row, column) order.

    ``tied``: this rank's tied entries (indices), in its (row, column) order.
    """
    counts = comm.all_gather(torch.tensor([tied.numel()], dtype=torch.int64, device=tied.device)).reshape(-1)
    counts = counts.tolist()
    mine = min(max(wanted - sum(counts[: comm.rank]), 0), counts[comm.rank])
    return tied[:mine]


def _mask_from(scores: Tensor, flat_index: Tensor) -> Tensor:
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.view(-1)[flat_index] = True
    return mask


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]


def _positive_keys(values: Tensor) -> Tensor:
    """int64 keys of the positive ``values``, ordered as the values (the IEEE bits of positive floats)."""
    values = values[values > 0].contiguous()
    return values.view(_int_dtype(values.dtype)).to(torch.int64)


def _key_value(key: int, dtype: torch.dtype) -> float:
    """The positive float of ``dtype`` whose bits are ``key``."""
    return torch.tensor([key], dtype=torch.int64).to(_int_dtype(dtype)).view(dtype).item()


# ------------------------------------------------------------------------------------ per-feature caps


def global_feature_choice(scores: Tensor, capacity: np.ndarray, comm: Communicator, shard: Shard) -> Tensor:
    """max <S, M> s.t. M^T 1 <= m over every rank's rows: per feature, its m_j largest positive scores.

    Each rank sends its per-feature top-min(m_j, n_r) positive values in c_j = min(m_j, n_max) slots
    (padded with -inf); every rank then finds the same threshold t_j = the m_j-th largest gathered
    value of column j (all entries above it were sent). Entries > t_j are kept, and the rest of m_j
    goes to the entries == t_j by global token index.
    """
    device, n_features = scores.device, scores.shape[1]
    capacity = torch.as_tensor(np.array(capacity), dtype=torch.int64, device=device)  # already <= n_global
    slots = capacity.clamp(max=shard.n_max)
    start = slots.cumsum(0) - slots
    column_of = torch.repeat_interleave(torch.arange(n_features, device=device), slots)  # (L,)
    local = select_top(scores, _as_count(np.minimum(capacity.cpu().numpy(), shard.n_local)), dim=0)
    rows, columns = local.nonzero().unbind(1)
    order = torch.argsort(columns, stable=True)
    rows, columns = rows[order], columns[order]
    per_column = torch.bincount(columns, minlength=n_features)
    slot = torch.arange(columns.numel(), device=device) - (per_column.cumsum(0) - per_column)[columns]
    send = scores.new_full((column_of.numel(),), float("-inf"))
    send[start[columns] + slot] = scores.detach()[rows, columns]
    gathered = comm.all_gather(send)  # (R, L)

    def per_rank_count(hit: Tensor) -> Tensor:  # (R, L) bool -> (R, F) counts per column
        counts = torch.zeros((comm.world_size, n_features), dtype=torch.int64, device=device)
        return counts.index_add_(1, column_of, hit.to(torch.int64))

    sent = per_rank_count(gathered > 0)
    enough = (sent.sum(0) >= capacity) & (capacity > 0)  # else every positive of the column was sent
    # t_j: sort every gathered value by (column ascending, value descending), read position m_j - 1
    values, value_column = gathered.reshape(-1), column_of.repeat(comm.world_size)
    by_value = torch.argsort(values, descending=True, stable=True)
    grouped = values[by_value[torch.argsort(value_column[by_value], stable=True)]]
    first = (slots * comm.world_size).cumsum(0) - slots * comm.world_size
    at = (first + capacity - 1).clamp(0, max(grouped.numel() - 1, 0))
    zero = torch.zeros((), dtype=scores.dtype, device=device)
    threshold = torch.where(enough, grouped[at] if grouped.numel() else zero, zero)  # 0: every positive
    threshold = torch.where(capacity == 0, torch.full_like(threshold, float("inf")), threshold)
    wanted = torch.where(enough, capacity - per_rank_count(gathered > threshold[column_of]).sum(0), 0)
    tied_sent = per_rank_count(gathered == threshold[column_of]) * enough
    # every entry > t_j is among this rank's candidates; so are its ties, unless some rank sent m_j values
    # with t_j the smallest (it may hold more): in those columns every rank counts its ties in full
    smallest_sent = torch.full((comm.world_size, n_features), float("inf"), dtype=scores.dtype, device=device)
    smallest_sent.scatter_reduce_(1, column_of.expand(comm.world_size, -1), gathered, "amin")
    cut = ((sent == capacity) & (smallest_sent == threshold) & enough).any(0)  # (F,), the same on every rank
    value = scores.detach()[rows, columns]
    over = value > threshold[columns]
    kept_rows, kept_columns = rows[over], columns[over]
    at = (value == threshold[columns]) & enough[columns] & ~cut[columns]
    tied_rows, tied_columns, counts = rows[at], columns[at], tied_sent
    if bool(cut.any()):
        cut_columns = cut.nonzero().squeeze(1)
        more_rows, more = (scores[:, cut_columns] == threshold[cut_columns]).nonzero().unbind(1)
        tied_rows, tied_columns = torch.cat([tied_rows, more_rows]), torch.cat([tied_columns, cut_columns[more]])
        order = torch.argsort(tied_columns, stable=True)  # by column; rows stay ascending within one
        tied_rows, tied_columns = tied_rows[order], tied_columns[order]
        counts = tied_sent.clone()  # exact where no rank cut; the cut columns' counts are exchanged
        counts[:, cut_columns] = comm.all_gather(torch.bincount(tied_columns, minlength=n_features)[cut_columns])
    mine = (wanted - counts[: comm.rank].sum(0)).clamp(min=0).minimum(counts[comm.rank])
    # the first mine_j ties of column j, by row (the tied entries are grouped by column, rows ascending)
    per_column = torch.bincount(tied_columns, minlength=n_features)
    first_of_column = (per_column.cumsum(0) - per_column)[tied_columns]
    take = torch.arange(tied_columns.numel(), device=device) - first_of_column < mine[tied_columns]
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    kept[torch.cat([kept_rows, tied_rows[take]]), torch.cat([kept_columns, tied_columns[take]])] = True
    return kept


# ------------------------------------------------------------------------------------ local ranks


def run_local_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 60.0,
                    threads: int = 1, join_s: Optional[float] = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes of one gloo group; exit codes.

    For tests and benchmarks on one machine (training proper is launched by torchrun). ``fn`` must be
    importable (a module-level function); ``timeout_s`` is the collectives' timeout; a process still
    alive ``join_s`` seconds after the start (default 2 timeout_s + 60) is killed (exit code None).
    """
    import multiprocessing
    import tempfile
    import time

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{folder}/rendezvous"
        processes = [context.Process(target=_rank_main, args=(fn, rank, world_size, init, backend, timeout_s,
                                                              threads, args)) for rank in range(world_size)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + (2 * timeout_s + 60 if join_s is None else join_s)
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
        codes = []
        for process in processes:
            alive = process.is_alive()
            if alive:
                process.kill()
                process.join()
            codes.append(None if alive else process.exitcode)
        return codes


def _rank_main(fn, rank: int, world_size: int, init: str, backend: str, timeout_s: float, threads: int,
               args: tuple) -> None:
    import sys
    import traceback

    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    except BaseException as error:  # the exit code says it failed; the message says why
        if not isinstance(error, SystemExit):
            traceback.print_exc()
        sys.stderr.flush()
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
        import os

        os._exit(code or 1)
    dist.destroy_process_group()
