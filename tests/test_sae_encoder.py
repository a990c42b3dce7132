"""The encoder's sparse backward is exact: the same gradients as the dense matmul backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocation.sae import SparseAutoencoder, TopK
from allocation.sae import encoder as encoder_module
from allocation.sae.encoder import affinities
from allocation.sae.losses import aux_k_loss, normalized_mse
from allocation.sae.model import FeatureChoice, MutualChoice


def _gradients(x, b_dec, W_enc, b_enc, upstream, *, sparse_backward):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, b_dec, W_enc, b_enc)]
    pre = affinities(*leaves, sparse_backward=sparse_backward)
    (pre * upstream).sum().backward()
    return [leaf.grad for leaf in leaves]


@st.composite
def encoder_problems(draw):
    """Inputs, parameters and an upstream gradient dL/dpre: zero outside a random kept set."""
    n, d, n_features = draw(st.integers(1, 9)), draw(st.integers(1, 5)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x, b_dec = torch.randn(n, d, generator=generator, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    W_enc = torch.randn(d, n_features, generator=generator, dtype=torch.float64)
    b_enc = torch.randn(n_features, generator=generator, dtype=torch.float64)
    density = draw(st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]))
    kept = torch.rand(n, n_features, generator=generator) < density
    values = draw(st.sampled_from(["normal", "ties", "with_zeros"]))
    upstream = torch.randn(n, n_features, generator=generator, dtype=torch.float64)
    if values == "ties":
        upstream = upstream.sign()
    if values == "with_zeros":
        upstream = upstream * (torch.rand(n, n_features, generator=generator) < 0.5)
    return x, b_dec, W_enc, b_enc, upstream * kept


@pytest.mark.parametrize("dense_fraction", [0.0, 1.0 / 8.0, 2.0], ids=["always-dense", "default", "always-sparse"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=encoder_problems(), features_per_chunk=st.sampled_from([1, 2, 5, 1024]))
def test_sparse_backward_equals_dense_backward(problem, features_per_chunk, dense_fraction, monkeypatch):
    """dL/dx, dL/db_dec, dL/dW_enc and dL/db_enc agree with the dense backward on either branch."""
    monkeypatch.setattr(encoder_module, "DENSE_FRACTION", dense_fraction)
    monkeypatch.setattr(encoder_module, "FEATURES_PER_CHUNK", features_per_chunk)
    sparse = _gradients(*problem, sparse_backward=True)
    dense = _gradients(*problem, sparse_backward=False)
    for name, got, expected in zip(("x", "b_dec", "W_enc", "b_enc"), sparse, dense):
        assert got.shape == expected.shape and got.is_contiguous(), name
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


def test_forward_values_are_the_plain_affine_map():
    generator = torch.Generator().manual_seed(0)
    x, b_dec = torch.randn(7, 4, generator=generator), torch.randn(4, generator=generator)
    W_enc, b_enc = torch.randn(4, 11, generator=generator), torch.randn(11, generator=generator)
    torch.testing.assert_close(affinities(x, b_dec, W_enc, b_enc), (x - b_dec) @ W_enc + b_enc)


@pytest.mark.parametrize("rule", [TopK(4), FeatureChoice(k=4), MutualChoice(4)], ids=lambda r: r.name)
def test_training_gradients_with_aux_loss_match_the_dense_backward(rule):
    """Main loss + aux_k_loss (its extra entries also reach pre): identical parameter gradients."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    grads = []
    for sparse_backward in (True, False):
        sae = SparseAutoencoder(16, 256, rule, seed=0).double()  # 12 of 256 entries per token: sparse branch
        sae.sparse_backward = sparse_backward
        out = sae(x)
        dead = torch.arange(256) % 3 == 0
        loss = normalized_mse(x, out.x_hat) + aux_k_loss(out.pre, x - out.x_hat, sae.W_dec, dead, k_aux=8)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("with_aux", [False, True], ids=["main-loss", "main-and-aux_k"])
@pytest.mark.parametrize("rule", [TopK(4), FeatureChoice(k=4), MutualChoice(4)], ids=lambda r: r.name)
def test_kept_entries_reach_the_encoder_as_a_sparse_gradient(rule, with_aux, monkeypatch):
    """Only kept entries (the code's, aux_k's) carry gradient: it arrives sparse, no (n, F) scan."""
    layouts = []
    original = encoder_module._Affinities.backward

    def spy(ctx, grad):
        layouts.append(grad.layout)
        return original(ctx, grad)

    monkeypatch.setattr(encoder_module._Affinities, "backward", staticmethod(spy))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for sparse_backward in (True, False):
        sae = SparseAutoencoder(16, 256, rule, seed=0, decode="sparse").double()
        sae.sparse_backward = sparse_backward
        out = sae(x)
        loss = normalized_mse(x, out.x_hat)
        if with_aux:
            dead = torch.arange(256) % 3 == 0
            loss = loss + aux_k_loss(out.pre, x - out.x_hat, sae.W_dec, dead, k_aux=8)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    assert layouts == [torch.sparse_coo]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_gather_kept_gradient_is_the_indexing_gradient():
    generator = torch.Generator().manual_seed(3)
    x, W = torch.randn(5, 3, generator=generator), torch.randn(3, 7, generator=generator, requires_grad=True)
    token, feature = (torch.rand(5, 7, generator=generator) < 0.3).nonzero(as_tuple=True)
    weights = torch.randn(token.numel(), generator=generator)
    pre = affinities(x, torch.zeros(3), W, torch.zeros(7))
    (encoder_module.gather_kept(pre, token, feature) * weights).sum().backward()
    expected = torch.zeros(5, 7).index_put((token, feature), weights)
    torch.testing.assert_close(W.grad, x.t() @ expected)
