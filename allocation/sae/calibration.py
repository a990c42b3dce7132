"""Eval thresholds calibrated to a target L0 on a calibration set.

Calibration asks for inference thresholds that give a chosen L0 on a calibration set:

    thresholds = the prices of the rule's own allocation over the calibration tokens taken as one
                 batch, with its budget set to target_l0 per token

(a budget is set to target_l0 n, e.g. Mutual Choice's global top-(target_l0 n); without one the
per-feature caps are rescaled to sum to target_l0 n, e.g. Feature Choice's top-m_j; per-token caps
stay). On the calibration tokens the eval code ``pre > threshold`` then keeps exactly that budget,
up to ties.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from .._masks import count_selected
from ..errors import AllocationError
from . import thresholds
from .sparse import SparseCode
from .thresholds import calibration_constraints, rescaled_capacities


def calibrated_capacities(rule, n_tokens: int, n_features: int, target_l0: float) -> Tensor:
    """The rule's per-feature capacities for ``n_tokens``, rescaled to sum to round(target_l0 n_tokens).

    Largest-remainder rounding keeps the sum exact; a capacity above n_tokens is cut to n_tokens (a
    column cannot keep more), which is the one case where the sum falls short.
    """
    capacity = rule.constraints(n_tokens, n_features).per_feature
    if capacity is None:
        raise AllocationError(f"{rule} has no per-feature capacities")
    return rescaled_capacities(capacity, n_tokens, n_features, round(target_l0 * n_tokens))


@torch.no_grad()
def calibrated_thresholds(sae, activations: Tensor, target_l0: float) -> Optional[Tensor]:
    """(F,) eval thresholds giving L0 = target_l0 on ``activations`` (n, d_in); None without batch dependence.

    The rule's constraints for the calibration batch, their budget (or per-feature caps) rescaled to
    target_l0 per token (``calibration_constraints``), solved exactly; their prices are the thresholds.
    """
    if not sae.batch_dependent:
        return None
    pre = sae.pre_activations(activations)
    n_tokens, n_features = pre.shape
    constraints = calibration_constraints(sae.constraints(n_tokens), n_tokens, n_features, target_l0)
    selection = thresholds.select(pre, constraints, sae.pricing)
    code = SparseCode.from_mask(pre, selection.mask)
    return thresholds.batch_prices(pre, selection.mask, code.feature_index, code.values, constraints,
                                   sae.pricing, selection.prices, frontier=selection.frontier)


def calibrate_thresholds(sae, activations: Tensor, target_l0: Optional[float] = None) -> dict:
    """Set ``sae``'s eval thresholds so that its eval-mode L0 on ``activations`` is ``target_l0``.

    ``target_l0`` defaults to the rule's k (its training budget per token) when it has one. Replaces the running
    estimate (training on afterwards starts the average again from the calibrated value). TopK
    needs no thresholds: it is left as it is. Returns what was done and the L0 reached on
    ``activations`` in eval mode.
    """
    n_features = sae.n_features
    if target_l0 is None:
        target_l0 = sae.rule.options().get("k")
        if target_l0 is None:
            raise AllocationError(f"{sae.rule} has no k: pass target_l0, the L0 per token to calibrate to")
    if not (isinstance(target_l0, (int, float)) and 0 < float(target_l0) <= n_features):
        raise AllocationError(f"target_l0 must be a number in (0, n_features={n_features}], got {target_l0!r}")
    thresholds = calibrated_thresholds(sae, activations, float(target_l0))
    if thresholds is not None:
        sae.set_thresholds(thresholds)
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            l0 = float(count_selected(sae(activations).mask)) / activations.shape[0]
    finally:
        sae.train(was_training)
    return {"calibrated": thresholds is not None, "target_l0": float(target_l0), "calibration_l0": l0,
            "calibration_tokens": int(activations.shape[0])}


def training_l0(sae, n_tokens: int = 4096) -> float:
    """The rule's budget per token in training, budget(n, F) / n (k for TopK(k), FC(k), MC(k))."""
    return sae.budget(n_tokens) / n_tokens


def calibrated_copy(sae, activations: Tensor, target_l0: Optional[float] = None):
    """(a calibrated deep copy of ``sae``, the ``calibrate_thresholds`` report); ``sae`` is untouched."""
    twin = copy.deepcopy(sae)
    return twin, calibrate_thresholds(twin, activations, target_l0)
