"""Calibrated eval thresholds: the rule's own allocation over the calibration tokens at L0 = target."""

from __future__ import annotations

import pytest
import torch

from allocation.errors import AllocationError
from allocation.sae import FeatureChoice, MutualChoice, SparseAutoencoder, TopK, calibrate_thresholds, calibrated_copy
from allocation.sae.calibration import calibrated_capacities


def _sae(rule, d_in=12, n_features=40):
    sae = SparseAutoencoder(d_in, n_features, rule, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # more positive affinities than any budget below
    return sae


def _data(n=300, d_in=12, seed=1):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", [MutualChoice(4), FeatureChoice(k=4)], ids=lambda r: r.name)
@pytest.mark.parametrize("target", [2.0, 4.0, 7.5])
def test_calibrated_l0_on_the_calibration_tokens_is_the_target(rule, target):
    """Tie-free scores: eval-mode L0 on the calibration set equals the target (FC: up to rounding of m_j)."""
    sae, x = _sae(rule), _data()
    report = calibrate_thresholds(sae, x, target)
    assert report["calibrated"] and report["target_l0"] == target
    sae.eval()
    with torch.no_grad():
        l0 = float(sae(x).mask.sum()) / x.shape[0]
    assert l0 == report["calibration_l0"]
    tolerance = 0.0 if isinstance(rule, MutualChoice) else sae.n_features * 0.5 / x.shape[0]
    assert abs(l0 - target) <= tolerance + 1e-12


def test_mutual_choice_threshold_lies_between_the_budget_and_the_next_score():
    sae, x = _sae(MutualChoice(4)), _data()
    calibrate_thresholds(sae, x, 3.0)
    with torch.no_grad():
        ranked = sae.pre_activations(x).flatten().sort(descending=True).values
    budget = 3 * x.shape[0]
    threshold = float(sae.threshold[0])
    assert float(ranked[budget]) < threshold < float(ranked[budget - 1])
    assert torch.all(sae.threshold == threshold)  # one global price


def test_feature_choice_keeps_the_shape_of_its_capacities():
    capacities = [8] * 10 + [2] * 30
    sae, x = _sae(FeatureChoice(capacities=capacities)), _data()
    scaled = calibrated_capacities(sae.rule, x.shape[0], sae.n_features, 1.4)  # x 3: 24s and 6s
    assert scaled.tolist() == [24] * 10 + [6] * 30
    uneven = calibrated_capacities(sae.rule, x.shape[0], sae.n_features, 1.0)  # 17.14s and 4.29s
    assert int(uneven.sum()) == x.shape[0] and set(uneven.tolist()) <= {17, 18, 4, 5}
    calibrate_thresholds(sae, x, 1.4)
    sae.eval()
    with torch.no_grad():
        per_feature = sae(x).mask.sum(dim=0)
    assert torch.equal(per_feature, scaled)


def test_topk_needs_no_calibration_and_is_left_alone():
    sae, x = _sae(TopK(3)), _data()
    before = sae.threshold.clone()
    report = calibrate_thresholds(sae, x)
    assert not report["calibrated"] and report["calibration_l0"] == 3.0
    assert torch.equal(sae.threshold, before)


def test_calibrated_copy_leaves_the_original_untouched():
    sae, x = _sae(MutualChoice(4)), _data()
    before = sae.threshold.clone()
    twin, report = calibrated_copy(sae, x, 2.0)
    assert torch.equal(sae.threshold, before) and not torch.equal(twin.threshold, before)
    assert report["calibration_l0"] == 2.0


def test_bad_targets_name_the_argument():
    sae, x = _sae(MutualChoice(4)), _data()
    for bad in (0, -1.0, 41, "4"):
        with pytest.raises(AllocationError, match="target_l0"):
            calibrate_thresholds(sae, x, bad)
    with pytest.raises(AllocationError, match="target_l0"):
        calibrate_thresholds(_sae(FeatureChoice(m=3)), x)
