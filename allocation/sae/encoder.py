"""The encoder's affinities with a backward pass that reads only the kept entries.

    pre = (x - b_dec) @ W_enc + b_enc                                   (n, F)

Every loss of an SAE reaches ``pre`` through the entries some allocation kept (the main code, the
auxiliary losses' extra entries), so dL/dpre is zero everywhere else. The dense backward still
multiplies that mostly-zero (n, F) matrix into two (n, F) x (F, d) products, O(n F d). Here the
backward gathers the nonzero entries (token i, feature j, g_ij) once and computes, exactly,

    dL/dW_enc[:, j] = sum_i g_ij (x_i - b_dec)        dL/db_enc[j] = sum_i g_ij
    dL/db_dec       = -W_enc (sum_i g_i.)             dL/dx_i      = sum_j g_ij W_enc[:, j]

in O(nnz d + F d) (``embedding_bag`` sums over the entries grouped by feature, and by token),
falling back to the dense products when more than ``DENSE_FRACTION`` of the entries are nonzero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE_FRACTION = 1.0 / 8.0
"""Above this fraction of nonzero gradient entries the two dense matmuls are cheaper."""


class _Affinities(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        centered = x - b_dec
        ctx.save_for_backward(centered, W_enc)
        return torch.addmm(b_enc, centered, W_enc)

    @staticmethod
    def backward(ctx, grad: Tensor):
        centered, W_enc = ctx.saved_tensors
        need_x, need_b_dec, need_W_enc, need_b_enc = ctx.needs_input_grad
        if grad.is_sparse:  # only kept entries reached pre (gather_kept): their indices come with them
            grad = grad.coalesce()
            (token, feature), values = grad.indices(), grad.values()  # row-major: grouped by token
        else:
            token, feature = grad.nonzero(as_tuple=True)  # row-major: grouped by token
            if token.numel() > DENSE_FRACTION * grad.numel():
                return _dense_backward(grad, centered, W_enc, ctx.needs_input_grad)
            values = grad[token, feature]
        per_feature = torch.zeros(grad.shape[1], dtype=grad.dtype, device=grad.device)
        per_feature.index_add_(0, feature, values)
        grad_x = grad_b_dec = grad_W_enc = None
        if need_x:
            grad_x = _sum_per_bag(token, grad.shape[0], feature, values, W_enc.t().contiguous())
        if need_b_dec:
            grad_b_dec = -(W_enc @ per_feature)
        if need_W_enc:  # regroup the entries by feature, in place of the by-token lists (peak memory)
            by_feature = torch.argsort(feature, stable=True)
            feature, token, values = feature[by_feature], token[by_feature], values[by_feature]
            del by_feature
            grad_W_enc = _feature_gradient(feature, token, values, centered, W_enc)
        return grad_x, grad_b_dec, grad_W_enc, per_feature if need_b_enc else None


def _sum_per_bag(bag: Tensor, n_bags: int, index: Tensor, weight: Tensor, table: Tensor) -> Tensor:
    """out[b] = sum over entries e with bag[e] = b of weight[e] * table[index[e]]; ``bag`` sorted."""
    counts = torch.bincount(bag, minlength=n_bags)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)


FEATURES_PER_CHUNK = 256
"""Features per embedding_bag call of the W_enc gradient: its (chunk, d) rows are written into the
(d, F) gradient, so no second (F, d) buffer exists at the step's peak."""


def _feature_gradient(feature: Tensor, token: Tensor, values: Tensor, centered: Tensor, W_enc: Tensor) -> Tensor:
    """dL/dW_enc (d, F), row-major like W_enc: column j = sum of values[e] * centered[token[e]] over feature[e] = j.

    ``feature`` sorted; each chunk of features owns one contiguous range of entries.
    """
    d_in, n_features = W_enc.shape
    out = torch.empty(d_in, n_features, dtype=values.dtype, device=values.device)
    counts = torch.bincount(feature, minlength=n_features)
    starts = torch.cumsum(counts, 0) - counts
    bounds = torch.cat([starts[::FEATURES_PER_CHUNK], counts.sum().reshape(1)]).tolist()
    for chunk, first in enumerate(range(0, n_features, FEATURES_PER_CHUNK)):
        last = min(first + FEATURES_PER_CHUNK, n_features)
        begin, end = bounds[chunk], bounds[chunk + 1]
        rows = F.embedding_bag(
            token[begin:end], centered, starts[first:last] - begin, mode="sum", per_sample_weights=values[begin:end]
        )
        out[:, first:last] = rows.t()
    return out


def _dense_backward(grad: Tensor, centered: Tensor, W_enc: Tensor, needs: tuple):
    """The ordinary backward of (x - b_dec) @ W_enc + b_enc."""
    if grad.is_sparse:
        grad = grad.to_dense()
    need_x, need_b_dec, need_W_enc, need_b_enc = needs
    grad_centered = grad @ W_enc.t() if (need_x or need_b_dec) else None
    return (
        grad_centered if need_x else None,
        -grad_centered.sum(0) if need_b_dec else None,
        centered.t() @ grad if need_W_enc else None,
        grad.sum(0) if need_b_enc else None,
    )


class _GatherKept(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, token: Tensor, feature: Tensor) -> Tensor:
        ctx.save_for_backward(token, feature)
        ctx.shape = scores.shape
        return scores[token, feature]

    @staticmethod
    def backward(ctx, grad: Tensor):
        token, feature = ctx.saved_tensors
        indices = torch.stack([token, feature])
        sparse = torch.sparse_coo_tensor(indices, grad, ctx.shape, check_invariants=False, is_coalesced=True)
        return sparse, None, None


def gather_kept(scores: Tensor, token: Tensor, feature: Tensor) -> Tensor:
    """scores[token, feature] (nnz,); when ``scores`` comes from ``affinities``, its gradient is sparse.

    (token, feature) must be distinct and sorted row-major, as ``mask.nonzero()`` gives them. The
    encoder's backward then reads the kept entries from the sparse gradient directly: no dense
    (n, F) gradient is allocated and scanned.
    """
    if not (torch.is_grad_enabled() and type(scores.grad_fn) is _Affinities._backward_cls):
        return scores[token, feature]  # other ops (e.g. torch.where) expect a dense gradient
    return _GatherKept.apply(scores, token, feature)


def affinities(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, *, sparse_backward: bool = True) -> Tensor:
    """pre = (x - b_dec) @ W_enc + b_enc (n, F); its backward costs O(nnz d) where dL/dpre is sparse."""
    if not sparse_backward or not torch.is_grad_enabled():
        return torch.addmm(b_enc, x - b_dec, W_enc)
    return _Affinities.apply(x, b_dec, W_enc, b_enc)
