"""Losses against hand-computed values, and one regression test per aux-loss lesson."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from allocation import AllocationError
from allocation.sae import FeatureUsage, aux_k_loss, aux_zipf_loss, fvu, mse_loss, zipf_targets
from allocation.sae.losses import (
    aux_k_selection,
    aux_zipf_capacities,
    aux_zipf_selection,
    aux_zipf_targets,
    deficits,
    fit_zipf,
    fitted_zipf_targets,
    normalized_mse,
    proportional_capacities,
    reduce_squared_error,
)
from allocation.sae.metrics import UNDER_USED_FACTOR

# A hand-sized problem: 2 tokens, d = 2, F = 4; features 2 and 3 are dead.
W_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
PRE = torch.tensor([[0.5, 2.0, 1.0, 3.0], [1.5, -1.0, 2.0, 0.5]])
RESIDUAL = torch.tensor([[2.0, -1.0], [1.0, 2.0]])
DEAD = torch.tensor([False, False, True, True])
# residual variance R(||e - mean e||^2): mean e = (1.5, 0.5); each token contributes 0.25 + 2.25
RESIDUAL_VARIANCE = 2.5


def test_mse_and_fvu_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
    assert float(mse_loss(x, x_hat)) == pytest.approx((1 + 1) / 2)
    assert float(mse_loss(x, x_hat, reduction="sum")) == pytest.approx(2.0)
    # ||x - mean x||^2 = 4 * 1^2 = 4
    assert float(fvu(x, x_hat)) == pytest.approx(2 / 4)
    # normalized MSE: mean over tokens of squared error (1) over mean over tokens of variance (2)
    assert float(normalized_mse(x, x_hat)) == pytest.approx(1 / 2)
    assert float(normalized_mse(x, x_hat, reduction="sum")) == pytest.approx(2 / 4)


def test_aux_k_loss_by_hand_default_k_aux_is_half_d_in():
    # default k_aux = d // 2 = 1: token 0 takes dead feature 3 (3.0), token 1 dead feature 2 (2.0)
    # e_hat = [[2.4, -1.8], [1.2, 1.6]]; squared errors 0.8 and 0.2, mean 0.5; scale min(2/1, 1) = 1
    expected = (0.5 / RESIDUAL_VARIANCE) / 32
    assert float(aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD)) == pytest.approx(expected)
    assert float(aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD, k_aux=1)) == pytest.approx(expected)


def test_aux_k_loss_by_hand_scale_min_ndead_over_kaux():
    # k_aux = 4 > n_dead = 2: both dead features per token, scale 2/4
    # e_hat = [[3.0, -1.0], [1.6, 1.3]]; squared errors 1.0 and 0.85, mean 0.925
    expected = 0.5 * (0.925 / RESIDUAL_VARIANCE) / 32
    assert float(aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD, k_aux=4)) == pytest.approx(expected)
    mask, scale = aux_k_selection(PRE, DEAD, 4)
    assert scale == 0.5 and mask.sum(dim=1).tolist() == [2, 2]


def test_regression_aux_coefficient_is_one_32nd():
    one = aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD, coefficient=1.0)
    assert float(aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD)) == pytest.approx(float(one) / 32)


def test_regression_residual_target_is_detached():
    residual = RESIDUAL.clone().requires_grad_(True)
    pre = PRE.clone().requires_grad_(True)
    for loss in (
        aux_k_loss(pre, residual, W_DEC, DEAD),
        aux_zipf_loss(
            pre, torch.zeros(2, 4, dtype=torch.bool), residual, W_DEC, torch.tensor([0.5, 0.5, 0.0, 0.0]), 1.0
        ),
    ):
        grad_residual, grad_pre = torch.autograd.grad(loss, (residual, pre), allow_unused=True)
        assert grad_residual is None  # no gradient pushes x_hat towards the aux reconstruction
        assert grad_pre.abs().sum() > 0


def test_regression_aux_decode_has_no_decoder_bias():
    """e_hat = f_aux @ W_dec exactly: a residual equal to it gives zero loss (a b_dec would not)."""
    mask, _ = aux_k_selection(PRE, DEAD, 1)
    e_hat = torch.where(mask, PRE, torch.zeros(())) @ W_DEC
    assert float(aux_k_loss(PRE, e_hat, W_DEC, DEAD, k_aux=1)) == pytest.approx(0.0, abs=1e-9)


def test_regression_k_aux_default_and_scale_with_wide_inputs():
    generator = torch.Generator().manual_seed(0)
    pre = torch.rand(5, 10, generator=generator) + 0.1
    W_dec = torch.randn(10, 8, generator=generator)
    residual = torch.randn(5, 8, generator=generator)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[:3] = True  # 3 dead, default k_aux = 8 // 2 = 4: scale 3/4, 3 aux entries per token
    mask, scale = aux_k_selection(pre, dead, 4)
    assert scale == 0.75 and mask.sum(dim=1).tolist() == [3] * 5
    assert float(aux_k_loss(pre, residual, W_dec, dead)) == pytest.approx(
        float(aux_k_loss(pre, residual, W_dec, dead, k_aux=4))
    )
    assert float(aux_k_loss(pre, residual, W_dec, torch.zeros(10, dtype=torch.bool))) == 0.0


def test_regression_normalised_by_residual_variance():
    """Scaling the residual and the pre-activations together leaves the aux loss unchanged."""
    base = aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD)
    scaled = aux_k_loss(7.0 * PRE, 7.0 * RESIDUAL, W_DEC, DEAD)
    assert float(scaled) == pytest.approx(float(base))


def test_regression_reduction_matches_main_loss():
    """Both losses use one reduction: duplicating the batch leaves the 'mean' main loss and the aux loss
    unchanged, and the aux loss is the same ratio whichever reduction the main loss uses."""
    x_hat = RESIDUAL * 0.5
    doubled = lambda t: torch.cat([t, t])  # noqa: E731
    main = float(mse_loss(RESIDUAL, x_hat))
    assert float(mse_loss(doubled(RESIDUAL), doubled(x_hat))) == pytest.approx(main)
    aux = float(aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD))
    assert float(aux_k_loss(doubled(PRE), doubled(RESIDUAL), W_DEC, DEAD)) == pytest.approx(aux)
    assert float(aux_k_loss(PRE, RESIDUAL, W_DEC, DEAD, reduction="sum")) == pytest.approx(aux)
    squared = torch.arange(6.0).reshape(2, 3)
    assert float(reduce_squared_error(squared, "mean")) == pytest.approx(15 / 2)
    assert float(reduce_squared_error(squared, "sum")) == pytest.approx(15)


def test_regression_dead_is_counted_in_tokens_default_ten_million():
    assert FeatureUsage(4).dead_tokens == 10_000_000
    usage = FeatureUsage(3, dead_tokens=25)
    fires_feature_0 = torch.tensor([[True, False, False]] * 10)
    usage.update(fires_feature_0)
    usage.update(torch.zeros(10, 3, dtype=torch.bool))
    assert usage.dead.tolist() == [False, False, False]  # 20 tokens < 25
    usage.update(torch.zeros(4, 3, dtype=torch.bool))
    assert usage.dead.tolist() == [False, False, False]  # 24 tokens: still alive
    usage.update(torch.zeros(1, 3, dtype=torch.bool))
    assert usage.dead.tolist() == [False, True, True]  # feature 0 last fired 15 tokens ago


# ------------------------------------------------------------------------- zipf


def test_zipf_targets_by_hand_with_tied_ranks():
    # ranks: f0 -> 1, f2 -> 2, f1 and f3 tie at ranks 3, 4 and share (1/3 + 1/4) / 2 = 7/24
    # sum of weights 25/12, budget 1: targets 12/25, 7/50, 6/25, 7/50
    targets = zipf_targets(torch.tensor([0.5, 0.0, 0.2, 0.0]), budget=1.0)
    torch.testing.assert_close(targets, torch.tensor([0.48, 0.14, 0.24, 0.14], dtype=torch.float64))


def test_zipf_targets_exponent_and_cap():
    # s = 2: weights 1, 1/4, 1/9 over three distinct usages; sum 49/36
    targets = zipf_targets(torch.tensor([0.3, 0.2, 0.1]), budget=1.0, s=2.0)
    torch.testing.assert_close(targets, torch.tensor([36 / 49, 9 / 49, 4 / 49], dtype=torch.float64))
    # budget 3 over 4 features: uncapped c = 1.44 > 1 at rank 1, so rank 1 sits at the cap and
    # c = (3 - 1) / (1/2 + 7/24 + 7/24) = 24/13 for the rest
    capped = zipf_targets(torch.tensor([0.5, 0.0, 0.2, 0.0]), budget=3.0)
    torch.testing.assert_close(capped, torch.tensor([1.0, 7 / 13, 12 / 13, 7 / 13], dtype=torch.float64))
    assert float(capped.sum()) == pytest.approx(3.0)


def test_proportional_capacities_sum_exactly():
    caps = proportional_capacities(torch.tensor([0.0, 0.14, 0.04, 0.14]), total=2, limit=10)
    assert caps.tolist() == [0, 1, 0, 1]  # raw 0, .875, .25, .875
    # water-filled: raw 1.6, 1.6, 3.2 puts feature 2 at the cap 2; the other 4 go to features 0 and 1
    caps = proportional_capacities(torch.tensor([1.0, 1.0, 2.0]), total=6, limit=2)
    assert caps.tolist() == [2, 2, 2]
    caps = proportional_capacities(torch.tensor([1.0, 1.0, 4.0]), total=5, limit=3)
    assert caps.tolist() == [1, 1, 3]  # raw 5/6, 5/6, 10/3 -> cap 3 binds, the rest split 1, 1


def test_regression_capped_capacities_keep_every_aux_match():
    """The capacities used to be clamped at the column size after rounding (1, 1, 2 at total 9 and
    limit 3 gave 2, 2, 3: two of the 9 promised auxiliary matches lost); now the excess is water-filled
    onto the uncapped features. fill=False keeps the old rule for configs saved before 0.2."""
    weights = torch.tensor([1.0, 1.0, 2.0])
    assert proportional_capacities(weights, total=9, limit=3).tolist() == [3, 3, 3]
    assert proportional_capacities(weights, total=9, limit=3, fill=False).tolist() == [2, 2, 3]


def test_aux_zipf_loss_by_hand():
    # usage (0.5, 0, 0.2, 0), budget 1: targets (.48, .14, .24, .14), deficits (0, .14, .04, .14)
    # |D| = 3, k_aux = 1: 2 aux matches split by deficit -> capacities (0, 1, 0, 1)
    # already active: pre > 1.9 -> (0,1), (0,3), (1,2). Feature 1 has no free positive token;
    # feature 3 takes token 1 (0.5). e_hat = [[0, 0], [0.4, -0.3]]
    # squared errors: 5 and 0.36 + 5.29 = 5.65, mean 5.325; scale min(3/1, 1) = 1
    active = PRE > 1.9
    usage = torch.tensor([0.5, 0.0, 0.2, 0.0])
    absolute = {"deficit": "absolute", "under_used_only": False}  # the formula before 0.2
    mask, scale = aux_zipf_selection(PRE, active, usage, 1.0, 1, **absolute)
    assert scale == 1.0 and mask.nonzero().tolist() == [[1, 3]]
    expected = (5.325 / RESIDUAL_VARIANCE) / 32
    assert float(aux_zipf_loss(PRE, active, RESIDUAL, W_DEC, usage, 1.0, k_aux=1, **absolute)) == pytest.approx(
        expected)


def test_aux_zipf_default_by_hand():
    """The default (relative deficit, under-used only): usage (0.5, 0, 0.2, 0), budget 1, F = 4, so the
    under-used threshold is 0.1 / 4 = 0.025: only the unused features 1 and 3 qualify, with relative
    deficits 1 and 1; k_aux = 1 splits 2 matches 1, 1 (as before). Feature 1 has no free positive token,
    feature 3 takes token 1: the same mask and loss as the absolute deficit on this example."""
    active = PRE > 1.9
    usage = torch.tensor([0.5, 0.0, 0.2, 0.0])
    capacities, n_candidates = aux_zipf_capacities(usage, 1.0, 2, 1)
    assert capacities.tolist() == [0, 1, 0, 1] and n_candidates == 2
    mask, scale = aux_zipf_selection(PRE, active, usage, 1.0, 1)
    assert scale == 1.0 and mask.nonzero().tolist() == [[1, 3]]
    assert float(aux_zipf_loss(PRE, active, RESIDUAL, W_DEC, usage, 1.0, k_aux=1)) == pytest.approx(
        (5.325 / RESIDUAL_VARIANCE) / 32)


def _saturated_case(d_in):
    generator = torch.Generator().manual_seed(3)
    n, n_features = 16, 32
    pre = torch.randn(n, n_features, generator=generator).requires_grad_(True)
    W_dec = torch.randn(n_features, d_in, generator=generator).requires_grad_(True)
    residual = torch.randn(n, d_in, generator=generator)
    usage = torch.zeros(n_features)
    usage[:4] = 1.0  # four saturated features; the other 28 never fire
    active = torch.zeros(n, n_features, dtype=torch.bool)
    active[:, :4] = pre.detach()[:, :4] > 0
    return pre, W_dec, residual, usage, active, usage == 0


def test_aux_zipf_reduces_to_aux_k_on_dead_features():
    """Usage 0 except saturated features, n_dead <= k_aux: same loss and gradients as aux_k_loss."""
    pre, W_dec, residual, usage, active, dead = _saturated_case(d_in=64)  # k_aux = 32 >= 28 dead
    zipf = aux_zipf_loss(pre, active, residual, W_dec, usage, budget=4.0)
    reference = aux_k_loss(pre, residual, W_dec, dead)
    assert float(reference.detach()) > 1e-4
    assert float(zipf.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    got_grads = torch.autograd.grad(zipf, (pre, W_dec))
    for got, want in zip(got_grads, torch.autograd.grad(reference, (pre, W_dec)), strict=True):
        torch.testing.assert_close(got, want)


def test_aux_zipf_with_many_dead_features_targets_only_dead_ones_with_aux_k_budget():
    pre, W_dec, residual, usage, active, dead = _saturated_case(d_in=8)  # k_aux = 4 < 28 dead
    zipf_mask, zipf_scale = aux_zipf_selection(pre, active, usage, 4.0, 4)
    k_mask, k_scale = aux_k_selection(pre, dead, 4)
    assert zipf_scale == k_scale == 1.0
    assert not bool(zipf_mask[:, ~dead].any())  # saturated features get no aux pressure
    assert int(zipf_mask.sum()) <= 4 * 16 and int(k_mask.sum()) <= 4 * 16
    per_feature = zipf_mask.sum(dim=0)[dead]
    assert int(per_feature.max()) - int(per_feature.min()) <= 3  # equal deficits: equal shares (~64/28)


def test_aux_zipf_pushes_under_used_not_only_dead_features():
    """A rarely used (not dead) feature below its Zipf target gets aux matches."""
    n_features = 8
    usage = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.001])
    targets = zipf_targets(usage, budget=4.0)
    assert targets[7] > usage[7] > 0
    pre = torch.ones(4, n_features)
    mask, _ = aux_zipf_selection(pre, torch.zeros(4, n_features, dtype=torch.bool), usage, 4.0, k_aux=2)
    assert bool(mask[:, 7].any())


# ------------------------------------------------------------------------- aux_zipf variants

VARIANTS = [
    {"deficit": "absolute"},
    {"deficit": "relative"},
    {"deficit": "log_ratio"},
    {"deficit": "absolute", "exclude_saturated": True},
    {"deficit": "relative", "exclude_saturated": True},
    {"deficit": "absolute", "fit": True},
    {"deficit": "relative", "fit": True},
    {"deficit": "log_ratio", "fit": True},
    {"deficit": "relative", "under_used_only": True},
]


def _name(variant):
    return "-".join(str(v) if not isinstance(v, bool) else k for k, v in variant.items())


@st.composite
def usage_problems(draw):
    """Usage vectors with dead (0), saturated (1) and in-between features, a budget, n and k_aux."""
    n_features = draw(st.integers(2, 24))
    kinds = st.sampled_from(["dead", "saturated", "used"])
    usage = []
    for _ in range(n_features):
        kind = draw(kinds)
        usage.append(0.0 if kind == "dead" else 1.0 if kind == "saturated" else draw(st.floats(1e-6, 0.999)))
    budget = draw(st.floats(0.01, float(n_features)))
    return torch.tensor(usage, dtype=torch.float64), budget, draw(st.integers(1, 12)), draw(st.integers(1, 8))


@pytest.mark.parametrize("variant", VARIANTS, ids=_name)
@settings(max_examples=60, deadline=None)
@given(problem=usage_problems())
def test_variant_capacities_sum_to_the_aux_k_budget_and_fit_the_columns(variant, problem):
    """sum_j m_j = min(k_aux, |D|) n and 0 <= m_j <= n: the aux_k_loss budget of matches, none lost."""
    usage, budget, n_tokens, k_aux = problem
    capacities, n_candidates = aux_zipf_capacities(usage, budget, n_tokens, k_aux, **variant)
    assert int(capacities.sum()) == min(k_aux, n_candidates) * n_tokens
    assert int(capacities.min()) >= 0 and int(capacities.max()) <= n_tokens


@pytest.mark.parametrize("variant", VARIANTS, ids=_name)
@settings(max_examples=60, deadline=None)
@given(problem=usage_problems())
def test_variant_puts_no_capacity_on_features_at_or_over_target(variant, problem):
    usage, budget, n_tokens, k_aux = problem
    options = {k: v for k, v in variant.items() if k in ("fit", "exclude_saturated")}
    targets = aux_zipf_targets(usage, budget, **options)
    capacities, _ = aux_zipf_capacities(usage, budget, n_tokens, k_aux, **variant)
    assert not bool(capacities[usage >= targets].any())
    assert not bool(capacities[usage >= 1.0].any())  # saturated features never get aux pressure
    if variant.get("exclude_saturated"):
        saturated_ranks = zipf_targets(usage, budget) >= 1.0
        assert not bool(capacities[saturated_ranks].any())
    if variant.get("under_used_only"):
        assert not bool(capacities[usage >= UNDER_USED_FACTOR * budget / usage.numel()].any())


@pytest.mark.parametrize("variant", VARIANTS, ids=_name)
@pytest.mark.parametrize("d_in", [64, 8])
def test_variant_reduces_to_aux_k_on_dead_features(variant, d_in):
    """Usage 0 except saturated features: every variant targets only the dead ones, equally; with
    n_dead <= k_aux (d_in = 64) that is aux_k_loss, value and gradients."""
    pre, W_dec, residual, usage, active, dead = _saturated_case(d_in=d_in)
    mask, scale = aux_zipf_selection(pre, active, usage, 4.0, d_in // 2, **variant)
    assert not bool(mask[:, ~dead].any())
    if d_in == 8:  # 28 dead > k_aux = 4: equal shares of the 4 n matches
        per_feature = aux_zipf_capacities(usage, 4.0, 16, 4, **variant)[0][dead]
        assert int(per_feature.max()) - int(per_feature.min()) <= 1 and int(per_feature.sum()) == 4 * 16
        return
    zipf = aux_zipf_loss(pre, active, residual, W_dec, usage, budget=4.0, **variant)
    reference = aux_k_loss(pre, residual, W_dec, dead)
    assert float(zipf.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for got, want in zip(torch.autograd.grad(zipf, (pre, W_dec)), torch.autograd.grad(reference, (pre, W_dec)),
                         strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fit", [False, True])
@settings(max_examples=80, deadline=None)
@given(problem=usage_problems())
def test_relative_and_log_ratio_give_dead_features_more_than_absolute(fit, problem):
    """Share of the total deficit on unused features: absolute <= relative <= log_ratio (a theorem:
    t_dead <= t_j and -log(x + eps) / log(1/eps) <= 1 - x); per dead feature the capacities follow,
    up to one match of rounding."""
    usage, budget, n_tokens, k_aux = problem
    dead = usage == 0
    assume(bool(dead.any()))
    targets = aux_zipf_targets(usage, budget, fit=fit)
    shares = []
    for kind in ("absolute", "relative", "log_ratio"):
        weight = deficits(usage, targets, kind)
        shares.append(float(weight[dead].sum() / weight.sum()) if float(weight.sum()) > 0 else 1.0)
    assert shares[0] <= shares[1] * (1 + 1e-9) and shares[1] <= shares[2] * (1 + 1e-9)
    capacity = {kind: aux_zipf_capacities(usage, budget, n_tokens, k_aux, deficit=kind, fit=fit)[0][dead]
                for kind in ("absolute", "relative", "log_ratio")}
    assert int(capacity["relative"].min()) >= int(capacity["absolute"].max()) - 1
    assert int(capacity["log_ratio"].min()) >= int(capacity["relative"].max()) - 1


def test_deficits_by_hand():
    usage = torch.tensor([0.0, 0.25, 0.5, 2.0])
    targets = torch.tensor([0.5, 0.5, 0.5, 1.0])
    as_float64 = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(deficits(usage, targets, "absolute"), as_float64([0.5, 0.25, 0, 0]))
    torch.testing.assert_close(deficits(usage, targets, "relative"), as_float64([1.0, 0.5, 0, 0]))
    expected = torch.tensor([-math.log(1e-3), -math.log(0.5 + 1e-3), 0, 0], dtype=torch.float64)
    torch.testing.assert_close(deficits(usage, targets, "log_ratio"), expected)
    with pytest.raises(AllocationError, match="deficit must be one of"):
        deficits(usage, targets, "square")


def test_fit_zipf_recovers_an_exact_power_law_and_ignores_the_low_end():
    ranks = torch.arange(1, 101, dtype=torch.float64)
    usage = 0.3 * ranks.pow(-0.7)
    usage[60:] = 1e-9  # the low end falls off the law: below the floor, out of the fit
    s, c = fit_zipf(usage[torch.randperm(100)], floor=1e-6)
    assert s == pytest.approx(0.7) and c == pytest.approx(0.3)
    assert fit_zipf(torch.tensor([0.5, 0.0, 0.0]), floor=1e-6) is None  # one rank above the floor: no fit
    targets = fitted_zipf_targets(usage, budget=5.0, floor=1e-6)
    law = 0.3 * ranks.pow(-0.7)  # the fitted law itself, not rescaled to the budget; the 40 tied share their mean
    torch.testing.assert_close(targets, torch.cat([law[:60], law[60:].mean().expand(40)]))
    with pytest.raises(AllocationError, match="floor must be > 0"):
        fit_zipf(usage, floor=0.0)


def test_fitted_targets_without_a_fit_fall_back_to_the_fixed_law():
    usage = torch.tensor([0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(fitted_zipf_targets(usage, 1.0, floor=1e-3), zipf_targets(usage, 1.0))


def test_exclude_saturated_zeroes_only_capped_ranks():
    usage = torch.tensor([0.5, 0.0, 0.2, 0.0])
    capped = zipf_targets(usage, budget=3.0)  # rank 1 (feature 0) sits at the cap 1
    excluded = aux_zipf_targets(usage, 3.0, exclude_saturated=True)
    assert float(capped[0]) == 1.0 and float(excluded[0]) == 0.0
    torch.testing.assert_close(excluded[1:], capped[1:])
