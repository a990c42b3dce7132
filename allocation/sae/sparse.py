"""Sparse codes: the kept (token, feature, value) entries of an allocation, and their decoding.

A code with nnz kept entries is decoded in O(nnz * d) memory and time with ``embedding_bag``
(``x_hat_i = sum_{j kept for token i} f_ij W_dec[j]``), never materialising the dense (n, F)
activation matrix; each token has its own number of entries (Feature Choice and Mutual Choice
are adaptive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._masks import count_selected
from .encoder import gather_kept


@dataclass
class SparseCode:
    """Kept entries of an (n_tokens, n_features) activation matrix, grouped by token.

    ``token_index``, ``feature_index`` and ``values`` have one entry per kept match, sorted by
    token; ``offsets[i]`` is where token i's entries start; ``counts[i]`` is token i's L0.
    ``values`` carries gradients to the scores it was gathered from.
    """

    token_index: Tensor  # (nnz,) int64
    feature_index: Tensor  # (nnz,) int64
    values: Tensor  # (nnz,) float
    offsets: Tensor  # (n_tokens,) int64
    counts: Tensor  # (n_tokens,) int64
    n_features: int

    @property
    def n_tokens(self) -> int:
        return int(self.counts.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_mask(cls, scores: Tensor, mask: Tensor) -> "SparseCode":
        """The entries of ``scores`` (n, F) where ``mask`` is True (values keep their gradient)."""
        token_index, feature_index = mask.nonzero(as_tuple=True)
        counts = count_selected(mask, dim=1)
        offsets = torch.cumsum(counts, 0) - counts
        return cls(
            token_index,
            feature_index,
            gather_kept(scores, token_index, feature_index),
            offsets,
            counts,
            int(scores.shape[1]),
        )

    def to_dense(self) -> Tensor:
        """The dense (n_tokens, n_features) activation matrix (zeros where nothing was kept)."""
        dense = self.values.new_zeros(self.n_tokens, self.n_features)
        return dense.index_put((self.token_index, self.feature_index), self.values)


def decode_sparse(code: SparseCode, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """x_hat = f @ W_dec (+ b_dec) from the kept entries only: embedding_bag(sum, weights=values)."""
    x_hat = F.embedding_bag(
        code.feature_index, W_dec, code.offsets, mode="sum", per_sample_weights=code.values
    )
    return x_hat if b_dec is None else x_hat + b_dec


def decode_dense(activations: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """x_hat = f @ W_dec (+ b_dec) with the dense (n, F) activation matrix f."""
    x_hat = activations @ W_dec
    return x_hat if b_dec is None else x_hat + b_dec


def decode_mask(
    scores: Tensor, mask: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None, *, sparse: bool = True
) -> Tensor:
    """Decode the activations ``scores * mask`` sparsely (default) or densely; same value and grads."""
    if sparse:
        return decode_sparse(SparseCode.from_mask(scores, mask), W_dec, b_dec)
    dense = torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return decode_dense(dense, W_dec, b_dec)
