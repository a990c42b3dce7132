"""Data-parallel SAE training on torch.distributed: what a batch rule, a loss and a counter see of the batch.

Each rank trains on its contiguous shard of every global batch; DistributedDataParallel averages
the gradients. A ``BatchScope`` is the SAE's view of the batch it allocates over:

    LOCAL                 one process: the batch is the rank's rows (every reduction the identity)
    RankScope("global")   the global batch: n = n_global; masks from ``allocation.distributed``; prices,
                          counts and the losses' variances all-reduced (2 ranks x n/2 = 1 process x n)
    RankScope("local")    each rank allocates its own rows (n = n_local, sparsify's choice); prices are
                          the ranks' average, gradients and counters are still global

The losses are each rank's share of the global loss (shares sum to it):
R(||x - x_hat||^2) over the rank's rows, divided by the batch's count (mean) and the global variance.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..constraints import Constraints
from ..distributed import Communicator, RankFailedError, Shard, gathered_allocate, global_allocate
from ..errors import AllocationError
from ..rules import allocate_unchecked

SCOPES = ("global", "local")

__all__ = ["LOCAL", "SCOPES", "BatchScope", "RankFailedError", "RankScope", "init_from_environment"]


class BatchScope:
    """One process: the batch is this process's rows; every reduction is the identity."""

    world_size = 1
    rank = 0
    allocation = "local"
    is_global = False  # whether the batch spans several processes

    def n_tokens(self, n_local: int) -> int:
        """The batch size the rule's caps are computed for."""
        return n_local

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def min(self, tensor: Tensor) -> Tensor:
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        return tensor

    def loss_sum(self, tensor: Tensor) -> Tensor:
        """A sum over the data-parallel batch (all ranks, whatever the allocation scope)."""
        return tensor

    def allocate(self, scores: Tensor, constraints: Constraints) -> Tensor:
        return allocate_unchecked(scores, constraints)

    def solve_mixed(self, scores: Tensor, constraints: Constraints):
        from ..exact_torch import solve_mixed

        return solve_mixed(scores, constraints), None

    def synchronise_(self, tensor: Tensor) -> None:
        """Make a per-rank state the ranks' average (local allocation); nothing for one process."""

    def __deepcopy__(self, memo) -> "BatchScope":
        return self  # a copied SAE (calibration) shares its scope


LOCAL = BatchScope()


class RankScope(BatchScope):
    """This rank's view of a global batch split in equal contiguous shards over the process group."""

    def __init__(self, comm: Communicator, n_global: int, allocation: str = "global") -> None:
        if allocation not in SCOPES:
            raise AllocationError(f"allocation_scope must be one of {', '.join(SCOPES)}, got {allocation!r}")
        self.comm, self.allocation = comm, allocation
        self.world_size, self.rank = comm.world_size, comm.rank
        self.shard = Shard.equal(n_global, comm.rank, comm.world_size)

    @property
    def is_global(self) -> bool:
        return self.allocation == "global"

    def rows(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch."""
        return batch[self.shard.offset: self.shard.offset + self.shard.n_local]

    def n_tokens(self, n_local: int) -> int:
        self._check_rows(n_local)
        return self.shard.n_global if self.is_global else n_local

    def _check_rows(self, n_local: int) -> None:
        if n_local != self.shard.n_local:
            raise AllocationError(f"rank {self.rank} got {n_local} tokens but its shard of the global batch "
                                  f"has {self.shard.n_local}; pass this rank's rows (RankScope.rows)")

    def sum(self, tensor: Tensor) -> Tensor:
        return self.comm.all_reduce(tensor.clone(), "sum") if self.is_global else tensor

    def min(self, tensor: Tensor) -> Tensor:
        return self.comm.all_reduce(tensor.clone(), "min") if self.is_global else tensor

    def max(self, tensor: Tensor) -> Tensor:
        return self.comm.all_reduce(tensor.clone(), "max") if self.is_global else tensor

    def loss_sum(self, tensor: Tensor) -> Tensor:
        return self.comm.all_reduce(tensor.detach().clone(), "sum")

    def allocate(self, scores: Tensor, constraints: Constraints) -> Tensor:
        if not self.is_global:
            return allocate_unchecked(scores, constraints)
        return global_allocate(scores, constraints, self.comm, self.shard)

    def solve_mixed(self, scores: Tensor, constraints: Constraints):
        """Mixed caps: the certified auction on the gathered batch (global), or on our rows (local)."""
        if not self.is_global:
            return BatchScope.solve_mixed(self, scores, constraints)
        from ..exact_torch import solve_mixed

        return gathered_allocate(scores, constraints, self.comm, self.shard, solve=solve_mixed)

    def synchronise_(self, tensor: Tensor) -> None:
        if not self.is_global:
            tensor.copy_(self.comm.all_reduce(tensor.clone(), "sum") / self.world_size)


def data_parallel(sae: torch.nn.Module, comm: Communicator, gradient_bytes: list) -> torch.nn.Module:
    """``sae`` in DistributedDataParallel (parameters broadcast from rank 0; buffers left to the scope).

    ``gradient_bytes[0]`` counts the gradient bytes this rank all-reduces (a communication hook).
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [sae.W_enc.device.index] if sae.W_enc.device.type == "cuda" else None
    try:
        model = DistributedDataParallel(sae, device_ids=device_ids, forward_sync_buffers=False,
                                        process_group=comm.group)
    except (RuntimeError, dist.DistError) as error:
        raise comm.failure("parameter broadcast", error) from None

    def counted(state, bucket):
        gradient_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    model.register_comm_hook(comm.group, counted)
    return model


WINDOW_SUMS = ("squared_error", "variance", "l0_counts", "fired", "tokens", "loss_sums")
"""MetricsWindow sums that add over ranks (``steps`` counts steps, the same on every rank)."""


def merge_window(window, scope: BatchScope, *, held_by_rank0: bool = False) -> None:
    """Every rank's MetricsWindow sums, added on every rank (one all-reduce).

    ``held_by_rank0``: afterwards only rank 0 keeps the merged sums (the copy a checkpoint saves);
    the others restart from zero, so that the next merge adds only what they saw since.
    """
    if not isinstance(scope, RankScope):
        return
    tensors = [getattr(window, name) for name in WINDOW_SUMS]
    flat = scope.loss_sum(torch.cat([tensor.to(torch.float64).reshape(-1) for tensor in tensors]))
    start = 0
    for tensor in tensors:
        part = flat[start: start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
        tensor.copy_(part if tensor.is_floating_point() else part.round())
    if held_by_rank0:
        window_share(window, scope)


def window_share(window, scope: BatchScope) -> None:
    """Keep a merged window's sums on rank 0 only (after a merge, or a resume: every rank loaded them)."""
    if isinstance(scope, RankScope) and scope.rank != 0:
        for name in WINDOW_SUMS:
            getattr(window, name).zero_()


def init_from_environment(device: str, timeout_s: float) -> Optional[Communicator]:
    """The process group torchrun describes (WORLD_SIZE > 1), joined once; None for one process.

    gloo on CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK); collectives time out after ``timeout_s``.
    A group the caller initialised already is used as it is.
    """
    timeout = timedelta(seconds=float(timeout_s))
    if dist.is_available() and dist.is_initialized():
        return Communicator(timeout=timeout) if dist.get_world_size() > 1 else None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Communicator(timeout=timeout)


def rank_device(device: str, comm: Optional[Communicator]) -> str:
    """``cuda`` under nccl means this rank's GPU (cuda:LOCAL_RANK)."""
    if comm is not None and str(device) == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device
