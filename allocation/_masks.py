"""Counting the selected entries of a bool mask, fast.

On CPU ``mask.sum()`` on a bool tensor accumulates through a slow int64 path: at 1024 x 6144 it
took 35 ms where ``mask.sum(dim, dtype=torch.int32)`` took 2-4 ms and ``torch.count_nonzero`` 6 ms.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def count_selected(mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Number of True entries (int64): in all when ``dim`` is None, else per slice along ``dim``.

    Per-slice counts are bounded by one dimension, so they are summed in int32 (no overflow below
    2^31 rows or columns) and widened; the total uses ``count_nonzero`` (int64 throughout).
    """
    if dim is None:
        return torch.count_nonzero(mask)
    return mask.sum(dim=dim, dtype=torch.int32).to(torch.int64)
