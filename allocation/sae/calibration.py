"""Eval thresholds calibrated to a target L0 on a calibration set.

Calibration asks for inference thresholds that give a chosen L0 on a calibration set:

    thresholds = the prices of the rule's own allocation over the calibration tokens taken as one
                 batch, with its budget set to target_l0 per token

(Mutual Choice: the global top-(target_l0 n); Feature Choice: each feature's top-m_j, the rule's
capacities rescaled to sum to target_l0 n). On the calibration tokens the eval code
``pre > threshold`` then keeps exactly that budget, up to ties.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from .._masks import count_selected
from ..errors import AllocationError
from ..rules import feature_choice, mutual_choice
from .prices import budget_price, feature_prices


def calibrated_capacities(rule, n_tokens: int, n_features: int, target_l0: float) -> Tensor:
    """The rule's per-feature capacities for ``n_tokens``, rescaled to sum to round(target_l0 n_tokens).

    Largest-remainder rounding keeps the sum exact; a capacity above n_tokens is cut to n_tokens (a
    column cannot keep more), which is the one case where the sum falls short.
    """
    capacity = rule.capacity(n_tokens, n_features)
    shape = (
        capacity.to(torch.float64)
        if isinstance(capacity, Tensor)
        else torch.full((n_features,), float(capacity), dtype=torch.float64)
    )
    total = float(shape.sum())
    if total <= 0:
        raise AllocationError("the rule's capacities are all 0: there is nothing to calibrate")
    budget = round(target_l0 * n_tokens)
    scaled = shape * (budget / total)
    counts = scaled.floor()
    remainder = scaled - counts
    extra = budget - int(counts.sum())
    if extra > 0:  # the largest remainders, ties to the lowest index
        order = torch.sort(remainder, descending=True, stable=True).indices
        counts[order[:extra]] += 1
    return counts.clamp(0, n_tokens).to(torch.int64)


@torch.no_grad()
def calibrated_thresholds(sae, activations: Tensor, target_l0: float) -> Optional[Tensor]:
    """(F,) eval thresholds giving L0 = target_l0 on ``activations`` (n, d_in); None for TopK."""
    if not sae.rule.batch_dependent:
        return None
    pre = sae.pre_activations(activations)
    n_tokens, n_features = pre.shape
    if hasattr(sae.rule, "capacity"):
        capacity = calibrated_capacities(sae.rule, n_tokens, n_features, target_l0)
        mask = feature_choice(pre, capacity)
        token_index, feature_index = mask.nonzero(as_tuple=True)
        return feature_prices(pre, mask, feature_index, pre[token_index, feature_index], capacity)
    budget = int(round(target_l0 * n_tokens))
    mask = mutual_choice(pre, budget)
    return budget_price(pre, mask, pre[mask], budget).expand(n_features).clone()


def calibrate_thresholds(sae, activations: Tensor, target_l0: Optional[float] = None) -> dict:
    """Set ``sae``'s eval thresholds so that its eval-mode L0 on ``activations`` is ``target_l0``.

    ``target_l0`` defaults to the rule's k (its training budget per token). Replaces the running
    estimate (training on afterwards starts the average again from the calibrated value). TopK
    needs no thresholds: it is left as it is. Returns what was done and the L0 reached on
    ``activations`` in eval mode.
    """
    n_features = sae.n_features
    if target_l0 is None:
        target_l0 = getattr(sae.rule, "k", None)
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


def calibrated_copy(sae, activations: Tensor, target_l0: Optional[float] = None):
    """(a calibrated deep copy of ``sae``, the ``calibrate_thresholds`` report); ``sae`` is untouched."""
    twin = copy.deepcopy(sae)
    return twin, calibrate_thresholds(twin, activations, target_l0)
