"""SparseAutoencoder: rules, validation, decoder geometry, sparse decode, dual-price thresholds."""

import pytest
import torch
from allocation_checks import blocked_everywhere
from hypothesis import given, settings
from hypothesis import strategies as st

import allocation.sae.model as model
import allocation.sae.prices as prices
import allocation.sae.thresholds as thresholds
from allocation.errors import AllocationError
from allocation.sae import (
    FeatureChoice,
    MutualChoice,
    SparseAutoencoder,
    SparseCode,
    TopK,
    decode_dense,
    decode_sparse,
    geometric_median,
)
from allocation.testing import score_matrices

RULES = [TopK(4), FeatureChoice(k=4), MutualChoice(4)]


def _data(n=64, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- validation


def test_k_above_n_features_names_k():
    for rule in (TopK(65), FeatureChoice(k=65), MutualChoice(65)):
        with pytest.raises(AllocationError, match="k=65 exceeds n_features=64"):
            SparseAutoencoder(16, 64, rule)


def test_wrong_d_in_names_the_dimension():
    sae = SparseAutoencoder(16, 64, TopK(4))
    with pytest.raises(AllocationError, match="d_in=16"):
        sae(torch.randn(8, 15))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activations_are_rejected(bad):
    sae = SparseAutoencoder(16, 64, TopK(4))
    x = _data(8)
    x[3, 2] = bad
    with pytest.raises(AllocationError, match="activations contain NaN or inf in 1 of 8 tokens"):
        sae(x)


def test_bad_rule_arguments():
    with pytest.raises(AllocationError, match="k must be >= 1"):
        TopK(0)
    with pytest.raises(AllocationError, match="exactly one of k, m or capacities"):
        FeatureChoice(k=2, m=3)
    with pytest.raises(AllocationError, match="capacities has 3 entries"):
        SparseAutoencoder(4, 8, FeatureChoice(capacities=[1, 2, 3]))
    with pytest.raises(AllocationError, match="rule must be"):
        SparseAutoencoder(4, 8, "topk")


# ---------------------------------------------------------------------------- geometry and init


def test_init_unit_decoder_rows_and_tied_encoder():
    sae = SparseAutoencoder(16, 64, TopK(4))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t() * model.ENCODER_INIT_SCALE, rtol=0, atol=0)
    assert sae.W_enc.is_contiguous()  # regression: a transposed W_enc broke fused Adam's resume (strides)
    scaled = SparseAutoencoder(16, 64, TopK(4), encoder_init_scale=0.25)
    assert torch.equal(scaled.W_enc, scaled.W_dec.t() * 0.25)
    with pytest.raises(AllocationError, match="encoder_init_scale"):
        SparseAutoencoder(16, 64, TopK(4), encoder_init_scale=0)


def test_parallel_gradient_is_removed_and_rows_renormalised():
    sae = SparseAutoencoder(16, 64, TopK(4))
    sae(_data()).x_hat.pow(2).sum().backward()
    assert sae.W_dec.grad.abs().sum() > 0
    before = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs()
    sae.remove_parallel_gradient()
    after = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs()
    assert before.max() > 1.0 and after.max() < 1e-6 * sae.W_dec.grad.norm()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_geometric_median_is_a_stationary_point_and_robust():
    points = torch.cat([_data(50, 3), torch.full((5, 3), 100.0)])
    median = geometric_median(points).to(torch.float64)
    diffs = median - points.to(torch.float64)
    gradient = (diffs / diffs.norm(dim=1, keepdim=True)).sum(dim=0)
    assert gradient.norm() < 1e-3  # the sum of unit vectors vanishes at the median
    assert median.norm() < 5 < points.mean(dim=0).norm()  # outliers pull the mean, not the median


def test_b_dec_initialised_to_geometric_median():
    sae = SparseAutoencoder(16, 64, TopK(4))
    sample = _data(200) + 3.0
    sae.initialize_b_dec(sample)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(sample))


# ---------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_training_budget_is_k_per_token(rule):
    sae = SparseAutoencoder(16, 64, rule)
    out = sae(_data(64) * 5)
    assert int(out.mask.sum()) == 4 * 64
    assert bool((out.pre[out.mask] > 0).all())  # only positive affinities are ever kept


def test_feature_choice_capacity_default_matches_topk_budget():
    rule = FeatureChoice(k=8)
    assert rule.capacity(n_tokens=4096, n_features=16384) == 2
    assert rule.budget(4096, 16384) == 8 * 4096
    uneven = FeatureChoice(k=16).capacity(n_tokens=512, n_features=1536)  # 16 * 512 / 1536 = 5.33
    assert int(uneven.sum()) == 16 * 512 and set(uneven.tolist()) == {5, 6}
    assert FeatureChoice(k=16).budget(512, 1536) == 16 * 512  # was 15 * 512 with round(k n / F)
    assert int(FeatureChoice(k=1).capacity(n_tokens=3, n_features=8).sum()) == 3  # k n < F: some get 0
    assert FeatureChoice(m=3).capacity(100, 7) == 3
    caps = FeatureChoice(capacities=[0, 1, 2]).capacity(10, 3)
    assert caps.tolist() == [0, 1, 2]


def test_feature_choice_per_feature_capacities_are_respected():
    caps = [0, 1, 2, 3, 4, 5, 6, 7]
    sae = SparseAutoencoder(4, 8, FeatureChoice(capacities=caps))
    out = sae(_data(32, 4) * 5)
    assert out.mask.sum(dim=0).tolist() == caps


# ---------------------------------------------------------------------------- sparse decode


def test_sparse_decode_equals_dense_forward_and_gradients():
    generator = torch.Generator().manual_seed(1)
    pre = torch.randn(12, 20, generator=generator, requires_grad=True)
    W_dec = torch.randn(20, 6, generator=generator, requires_grad=True)
    b_dec = torch.randn(6, generator=generator, requires_grad=True)
    mask = pre.detach() > 0.8
    mask[3] = False  # a token with no entries at all
    weights = torch.randn(12, 6, generator=generator)

    sparse_out = decode_sparse(SparseCode.from_mask(pre, mask), W_dec, b_dec)
    sparse_grads = torch.autograd.grad((sparse_out * weights).sum(), (pre, W_dec, b_dec))
    dense_out = decode_dense(torch.where(mask, pre, torch.zeros(())), W_dec, b_dec)
    dense_grads = torch.autograd.grad((dense_out * weights).sum(), (pre, W_dec, b_dec))

    torch.testing.assert_close(sparse_out, dense_out)
    for sparse_grad, dense_grad in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad)
    assert torch.equal(sparse_out[3], b_dec.detach())


def _largest_saved_for_backward(decode) -> int:
    """Elements of the largest tensor autograd keeps for the backward of ``decode()``."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        decode()
    return max(sizes)


def test_sparse_decode_memory_grows_with_kept_entries_not_with_n_times_f():
    """What the sparse decoder keeps for its backward is O(nnz + F d); the dense one keeps n x F."""
    n_tokens, n_features, d_in, per_token = 512, 8192, 16, 4
    generator = torch.Generator().manual_seed(2)
    pre = torch.randn(n_tokens, n_features, generator=generator, requires_grad=True)
    W_dec = torch.randn(n_features, d_in, generator=generator, requires_grad=True)
    mask = torch.zeros(n_tokens, n_features, dtype=torch.bool)
    chosen = torch.randint(0, n_features, (n_tokens, per_token), generator=generator)
    mask[torch.arange(n_tokens)[:, None], chosen] = True
    code = SparseCode.from_mask(pre, mask)
    sparse = _largest_saved_for_backward(lambda: decode_sparse(code, W_dec))
    dense = _largest_saved_for_backward(lambda: decode_dense(torch.where(mask, pre, torch.zeros(())), W_dec))
    assert dense >= n_tokens * n_features  # the check can tell the two apart
    assert sparse <= max(4 * code.nnz, n_features * d_in) < n_tokens * n_features // 8


def test_sparse_code_counts_and_dense_round_trip():
    pre = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    code = SparseCode.from_mask(pre, pre > 0)
    assert code.counts.tolist() == [2, 0, 2]
    assert code.offsets.tolist() == [0, 2, 2]
    assert torch.equal(code.to_dense(), pre)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_sae_sparse_and_dense_paths_agree(rule):
    x = _data(32)
    results = []
    for mode in ("sparse", "dense"):
        sae = SparseAutoencoder(16, 64, rule, decode=mode)
        out = sae(x)
        loss = (out.x_hat - x).pow(2).sum()
        loss.backward()
        results.append((out.x_hat.detach(), sae.W_enc.grad, sae.W_dec.grad, sae.b_dec.grad))
    for sparse_value, dense_value in zip(*results, strict=True):
        torch.testing.assert_close(sparse_value, dense_value, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("rule", [FeatureChoice(k=4), MutualChoice(4)], ids=lambda r: r.name)
def test_batch_dual_prices_reproduce_the_training_mask(rule):
    """With this batch's own prices, eval-mode thresholding selects exactly the training mask."""
    sae = SparseAutoencoder(16, 64, rule, threshold_decay=0.0)
    x = _data(64) * 3
    out = sae(x)
    sae.update_thresholds(out.pre, out.mask)
    sae.eval()
    assert torch.equal(sae(x).mask, out.mask)


def _price_by_definition(rule, pre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Midpoint of the smallest kept and largest dropped (>= 0) score per slice; 0 where slack; the
    largest score (>= 0) of a zero-capacity column."""
    inf = torch.tensor(float("inf"), dtype=pre.dtype)
    smallest_kept = torch.where(mask, pre, inf)
    largest_dropped = torch.where(mask, -inf, pre)
    if isinstance(rule, MutualChoice):
        kept = int(mask.sum())
        if kept == 0 or kept < rule.budget(*pre.shape):
            return torch.zeros(pre.shape[1], dtype=pre.dtype)
        price = (smallest_kept.min() + largest_dropped.max().clamp_min(0)) / 2
        return price.expand(pre.shape[1])
    price = (smallest_kept.amin(0) + largest_dropped.amax(0).clamp_min(0)) / 2
    kept = mask.sum(0)
    capacity = torch.as_tensor(rule.capacity(*pre.shape)).expand(pre.shape[1])
    tight = (kept >= capacity) & (kept > 0)
    price = torch.where(tight, price, torch.zeros_like(price))
    # a zero capacity is always tight: every entry is dropped, the price is the largest one (>= 0)
    return torch.where(capacity == 0, largest_dropped.amax(0).clamp_min(0), price)


@settings(max_examples=80)
@given(data=st.data(), pre=score_matrices(max_tokens=12, max_features=10))
def test_batch_prices_from_the_sparse_code_match_their_definition(data, pre):
    """The O(nnz) kept side (read from the code) equals the definition over the whole matrix,
    with ties, zeros, negative scores, slack and tight slices, with and without the code."""
    n, n_features = pre.shape
    k = data.draw(st.integers(1, n_features), label="k")
    rule = data.draw(
        st.sampled_from(
            [
                MutualChoice(k),
                FeatureChoice(k=k),
                FeatureChoice(m=data.draw(st.integers(1, n + 1), label="m")),
                FeatureChoice(capacities=data.draw(st.lists(st.integers(0, n + 1), min_size=n_features,
                                                            max_size=n_features), label="capacities")),
            ]
        ),
        label="rule",
    )
    sae = SparseAutoencoder(4, n_features, rule)
    mask = rule.select(pre)
    expected = _price_by_definition(rule, pre, mask)
    code = SparseCode.from_mask(pre, mask)
    torch.testing.assert_close(sae.batch_threshold(pre, mask, code), expected, rtol=0, atol=0)
    torch.testing.assert_close(sae.batch_threshold(pre, mask), expected, rtol=0, atol=0)


@settings(max_examples=80)
@given(data=st.data(), pre=score_matrices(max_tokens=40, max_features=12))
def test_pricing_from_the_selection_frontier_equals_pricing_from_the_mask(data, pre):
    """Feature and Mutual Choice's blocked selections hand their frontier to pricing: the batch prices
    and the count-corrected threshold updates equal those computed from the mask and the whole matrix."""
    n_tokens, n_features = pre.shape
    rule = data.draw(st.sampled_from([
        MutualChoice(data.draw(st.integers(1, n_features), label="budget k")),
        FeatureChoice(k=data.draw(st.integers(1, n_features), label="k")),
        FeatureChoice(m=data.draw(st.integers(1, n_tokens + 1), label="m")),
        FeatureChoice(capacities=data.draw(st.lists(st.integers(0, n_tokens + 1), min_size=n_features,
                                                    max_size=n_features), label="capacities")),
    ]), label="rule")
    from_frontier, from_mask = (SparseAutoencoder(4, n_features, rule) for _ in range(2))
    rows_per_block = data.draw(st.sampled_from([1, 2, 8]), label="rows per block")
    # batches whose prices fall below and above the running thresholds (which are then below some floors)
    for batch in (pre, 0.5 * pre, 2 * pre, pre.flip(0) - 1, pre):
        reach = from_frontier.thresholds.count_point(batch.dtype, batch.device)
        with blocked_everywhere(rows_per_block):
            selection = thresholds.select(batch, from_frontier.constraints(n_tokens), from_frontier.pricing,
                                          reach=reach)
        code = SparseCode.from_mask(batch, selection.mask)
        assert torch.equal(from_frontier.batch_threshold(batch, selection.mask, code, frontier=selection.frontier),
                           from_mask.batch_threshold(batch, selection.mask, code))
        from_frontier.update_thresholds(batch, selection.mask, code, frontier=selection.frontier)
        from_mask.update_thresholds(batch, selection.mask, code)
        for name, buffer in from_mask.thresholds.state_dict().items():
            assert torch.equal(from_frontier.thresholds.state_dict()[name], buffer), name


@pytest.mark.parametrize("rule", [FeatureChoice(k=8), MutualChoice(8)], ids=lambda r: r.name)
def test_batch_rules_price_from_their_frontier_at_training_sizes(rule):
    """At a training batch the blocked path runs by default, its frontier reaches the update, and
    after the first updates it covers the count correction's thresholds in (nearly) every column."""
    sae = SparseAutoencoder(32, 4096, rule)
    for seed in range(4):
        out = sae(_data(256, d=32, seed=seed) * 3)
        assert out.frontier is not None and int(out.frontier.chosen.sum()) == int(out.mask.sum())
        sae.update_thresholds(out.pre, out.mask, out.code, frontier=out.frontier)
    frontier = sae(_data(256, d=32, seed=9) * 3).frontier
    covered = sae.thresholds.count_point(out.pre.dtype, out.pre.device) >= frontier.floor
    assert float(covered.double().mean()) > 0.9


@settings(max_examples=60)
@given(data=st.data(), pre=score_matrices(max_tokens=12, max_features=8))
def test_chunked_threshold_passes_match_whole_matrix_reductions(data, pre):
    """The row-chunked passes equal one reduction over the matrix, for any chunk height."""
    mask = data.draw(st.lists(st.booleans(), min_size=pre.numel(), max_size=pre.numel()), label="mask")
    mask = torch.tensor(mask).reshape(pre.shape)
    threshold = pre[data.draw(st.integers(0, pre.shape[0] - 1), label="row")]  # ties with the scores
    chunk = data.draw(st.sampled_from([1, 2, 3, prices.ROWS_PER_CHUNK]), label="rows per chunk")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prices, "ROWS_PER_CHUNK", chunk)
        largest = prices.largest_dropped_per_column(pre, mask)
        above = prices.count_above_per_column(pre, threshold)
        above_scalar = prices.count_above_per_column(pre, threshold[0])
    assert torch.equal(largest, torch.where(mask, float("-inf"), pre).amax(dim=0))
    assert torch.equal(above, (pre > threshold).sum(0).double())
    assert torch.equal(above_scalar, (pre > threshold[0]).sum(0).double())


def test_mutual_choice_price_lies_between_budget_and_next_score():
    sae = SparseAutoencoder(16, 64, MutualChoice(4))
    out = sae(_data(32) * 3)
    price = sae.batch_threshold(out.pre, out.mask)
    ordered = out.pre.flatten().sort(descending=True).values
    budget = 4 * 32
    assert ordered[budget] <= price[0] <= ordered[budget - 1]
    assert torch.all(price == price[0])


def test_eval_code_does_not_depend_on_batch_mates():
    for rule in RULES:
        sae = SparseAutoencoder(16, 64, rule)
        x = _data(64) * 3
        out = sae(x)
        sae.update_thresholds(out.pre, out.mask)
        sae.eval()
        alone = sae.encode(x[:5])
        together = sae.encode(torch.cat([x[:5], 10 * _data(40, seed=3)]))[:5]
        torch.testing.assert_close(alone, together)


def test_thresholds_are_a_bias_corrected_running_average():
    sae = SparseAutoencoder(16, 64, MutualChoice(4), threshold_decay=0.5, threshold_correction=0.0)
    prices = []
    for seed in range(3):
        out = sae(_data(32, seed=seed) * 3)
        prices.append(float(sae.batch_threshold(out.pre, out.mask)[0]))
        sae.update_thresholds(out.pre, out.mask)
    expected = (0.25 * prices[0] + 0.5 * prices[1] + prices[2]) / 1.75
    assert float(sae.threshold[0]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rule", [FeatureChoice(k=4), MutualChoice(4)], ids=lambda r: r.name)
def test_count_correction_removes_the_bias_of_averaged_prices_on_bursty_batches(rule):
    """Batches alternate between scale 1 and 2: the average of per-batch prices keeps too few
    entries at eval; the dual-subgradient correction brings the expected count back to the budget."""

    def batch(index, generator):
        return torch.randn(64, 32, generator=generator) * (2.0 if index % 2 else 1.0)

    mean_l0 = {}
    for correction in (0.0, 0.05):
        sae = SparseAutoencoder(8, 32, rule, threshold_correction=correction)
        generator = torch.Generator().manual_seed(0)
        for index in range(2000):
            pre = batch(index, generator)
            sae.update_thresholds(pre, rule.select(pre))
        held_out = [batch(index, generator) for index in range(200)]
        mean_l0[correction] = sum(float((pre > sae.threshold).sum()) for pre in held_out) / (200 * 64)
    assert abs(mean_l0[0.0] - 4) > 0.16  # plain averaging: off by more than 4%
    assert abs(mean_l0[0.05] - 4) < 0.1  # corrected: within 2.5%
