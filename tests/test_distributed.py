"""Distributed training and global allocation on 2 CPU ranks (gloo), spawned by the tests.

Global allocation (``allocation.distributed``) is the single-process rule on the concatenated batch:
the same kept values per slice (so the same objective), exactly the budget under ties, and the same
mask when no two scores tie.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from allocation import AllocationError, Constraints, allocate
from allocation.distributed import Communicator, Shard, global_allocate, run_local_ranks
from allocation.testing import constraints, score_matrices

WORLD = 2


def _gather_rows(local: torch.Tensor, shard: Shard, comm: Communicator) -> torch.Tensor:
    padded = torch.zeros((shard.n_max, local.shape[1]), dtype=local.dtype)
    padded[: shard.n_local] = local
    parts = comm.all_gather(padded)
    return torch.cat([parts[r, :size] for r, size in enumerate(shard.sizes)])


def _kept_values(scores, mask, caps: Constraints):
    """The kept values, sorted: per column for feature caps alone, else overall (unique for laminar caps)."""
    if caps.per_feature is not None and caps.total is None:
        return [sorted(scores[:, j][mask[:, j]].tolist()) for j in range(scores.shape[1])]
    return sorted(scores[mask].tolist())


@st.composite
def split_problems(draw, per_token, per_feature, total):
    scores = draw(score_matrices(max_tokens=9, max_features=6))
    caps = draw(constraints(*scores.shape, per_token=per_token, per_feature=per_feature, total=total))
    cut = draw(st.integers(0, scores.shape[0]))
    return scores, caps, cut


def check_global_equals_single(rank, world_size, out):
    comm = Communicator()
    cases = {"mutual-choice": (False, False, True), "feature-choice": (False, True, False),
             "feature-choice + budget": (False, True, True), "topk + budget": (True, False, True)}
    checked = []
    for name, flags in cases.items():

        # no shrinking: both ranks must run the same examples in the same order (shrinking is timed)
        @settings(max_examples=80, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate])
        @given(split_problems(*flags))
        def property_(problem):
            scores, caps, cut = problem
            rows = slice(0, cut) if rank == 0 else slice(cut, None)
            local = scores[rows]
            shard = Shard(0 if rank == 0 else cut, local.shape[0], scores.shape[0],
                          (cut, scores.shape[0] - cut))
            mask = _gather_rows(global_allocate(local, caps, comm, shard), shard, comm)
            expected = allocate(scores, caps)
            assert _kept_values(scores, mask, caps) == _kept_values(scores, expected, caps), (name, scores, caps)
            assert int(mask.sum()) == int(expected.sum())  # exactly the budget, ties or not
            assert not bool(mask[scores <= 0].any())
            if scores.unique().numel() == scores.numel():  # tie-free: the mask itself is unique
                assert torch.equal(mask, expected), (name, scores, caps)

        property_()
        checked.append(name)
    if rank == 0:
        torch.save(checked, out)


def test_global_mutual_and_feature_choice_equal_single_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / "checked.pt"
    assert run_local_ranks(check_global_equals_single, WORLD, str(out)) == [0, 0]
    assert torch.load(out) == ["mutual-choice", "feature-choice", "feature-choice + budget", "topk + budget"]
