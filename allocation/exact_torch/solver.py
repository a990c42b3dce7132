"""``solve_mixed``: the exact mask for per-token AND per-feature caps (and a budget) in PyTorch.

The auction (``auction.py``) runs on the scores' device in float64 with epsilon-scaling until eps
is below ``rtol * objective / (selected + 1)``; its mask and prices are then checked by the LP
duality certificate (``certificate.py``) in the same call. If the certificate fails, or the round
limit is hit, the exact CPU solver (scipy/HiGHS) answers instead and a ``CertificateWarning`` says
so: the mask returned is never silently sub-optimal.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._validate import check_scores_torch
from ..constraints import Constraints
from ..errors import AllocationError
from ..exact.lp_solve import solve_lp
from .auction import Market, settle
from .certificate import Certificate, check_certificate

DEFAULT_RTOL = 1e-9  # allowed duality gap relative to the objective (float64 arithmetic)
EPS_FACTOR = 16.0  # eps shrinks by this factor per phase
MAX_ROUNDS = 20_000  # bidding rounds over all phases before giving up (then: fallback)


class CertificateWarning(UserWarning):
    """The torch solver could not certify its answer; the exact CPU solver answered instead."""


@dataclass(frozen=True)
class MixedSolution:
    """An exact mask with the prices that prove it: S_ij > a_i + b_j + lambda iff selected (ties aside)."""

    mask: Tensor  # (n, F) bool, on the scores' device
    objective: float  # sum of the selected scores, float64
    token_prices: Tensor  # (n,) float64, a_i >= 0
    feature_prices: Tensor  # (F,) float64, b_j >= 0
    budget_price: float  # lambda >= 0 (0 without a budget)
    certificate: Optional[Certificate]  # the check of the torch answer (None if never reached)
    method: str  # "auction" or "scipy-fallback"
    rounds: int
    phases: int
    seconds: float


def solve_mixed(
    scores: Tensor,
    constraints: Constraints,
    *,
    rtol: float = DEFAULT_RTOL,
    max_rounds: int = MAX_ROUNDS,
    fallback: bool = True,
    cpu_threads: Optional[int] = 1,
) -> MixedSolution:
    """Exact max <S, M> s.t. M 1 <= k, M^T 1 <= m, 1^T M 1 <= B, with an LP-duality certificate.

    ``scores`` is an (n, F) floating tensor on any device (float16/bfloat16 are computed in
    float64); ``constraints`` any ``Constraints`` (absent caps are treated as unbounded). The answer
    is certified when its duality gap is at most ``rtol * max(objective, max S)``; otherwise, with
    ``fallback=True``, allocation.solve (scipy/HiGHS) answers and a CertificateWarning is issued
    (with ``fallback=False`` an AllocationError is raised instead). On the CPU the auction runs
    with ``cpu_threads`` intra-op threads (restored afterwards; None keeps torch's setting): its
    rounds are many small tensor operations, where thread hand-offs cost more than they save and
    are ruinous on a busy machine (10x slower measured on 2 shared cores).
    """
    check_scores_torch(scores)
    if not isinstance(constraints, Constraints):
        raise AllocationError(
            f"constraints must be an allocation.Constraints, got {type(constraints).__name__}"
        )
    if not (rtol > 0 and np.isfinite(rtol)):
        raise AllocationError(f"rtol must be a finite number > 0, got {rtol!r}")
    start = time.perf_counter()
    device = scores.device
    values = scores.detach().to(torch.float64)
    n, f = values.shape
    caps = constraints.resolve(n, f)
    unbounded_token, unbounded_feature = f, n  # a cap at the dimension never binds
    token_caps = _cap_tensor(caps.per_token, n, unbounded_token, device)
    feature_caps = _cap_tensor(caps.per_feature, f, unbounded_feature, device)
    budget = caps.total
    scale = float(values.max().clamp(min=0.0))

    if scale == 0.0 or budget == 0:  # nothing worth selecting, or nothing allowed
        return _empty(values, token_caps, feature_caps, budget, scale, rtol, start)

    previous_threads = torch.get_num_threads()
    limit_threads = device.type == "cpu" and cpu_threads is not None and cpu_threads != previous_threads
    if limit_threads:
        torch.set_num_threads(int(cpu_threads))
    try:
        outcome = _certified_auction(values, token_caps, feature_caps, budget, scale, rtol, max_rounds, start)
    finally:
        if limit_threads:
            torch.set_num_threads(previous_threads)
    if isinstance(outcome, MixedSolution):
        return outcome
    reason, certificate, rounds, phases = outcome
    if not fallback:
        raise AllocationError(f"the torch solver could not certify its answer: {reason}")
    warnings.warn(CertificateWarning(
        f"allocation.exact_torch: {reason}; answered with the exact CPU solver (scipy/HiGHS) instead"
    ), stacklevel=2)
    return _fallback(values, constraints, device, certificate, rounds, phases, start)


def _certified_auction(values, token_caps, feature_caps, budget, scale, rtol, max_rounds, start):
    """Run the auction phase by phase until eps is fine enough and the certificate holds.

    Returns a MixedSolution, or (reason, last certificate, rounds, phases) when it cannot certify.
    """
    device = values.device
    market = Market(values, token_caps, feature_caps, budget)
    eps, rounds, phases = scale / EPS_FACTOR, 0, 0
    certificate = None
    while True:
        used = settle(market, eps, max_rounds - rounds)
        phases += 1
        if used < 0:
            reason = f"the auction did not settle within {max_rounds} rounds (eps {eps:.3g})"
            break
        rounds += used
        objective, count = market.objective(), market.count()
        target = rtol * max(objective, scale) / (count + 1)
        if eps <= target:
            result = market.result()
            certificate = check_certificate(
                values, result.mask, token_caps, feature_caps, budget, result.token_prices,
                result.feature_prices, result.budget_price,
                entry_tolerance=rtol * max(objective, scale), gap_tolerance=rtol * max(objective, scale),
            )
            if certificate.ok:
                return MixedSolution(result.mask.to(device), objective, result.token_prices,
                                     result.feature_prices, result.budget_price, certificate, "auction",
                                     rounds, phases, time.perf_counter() - start)
            if phases >= 64:
                reason = str(certificate)
                break
        eps = max(eps / EPS_FACTOR, min(target, eps / 2))
    return reason, certificate, rounds, phases


def _cap_tensor(cap: Optional[np.ndarray], length: int, unbounded: int, device) -> Tensor:
    """A resolved cap vector as int64 on ``device``, clipped to ``unbounded`` (None -> unbounded)."""
    if cap is None:
        return torch.full((length,), unbounded, dtype=torch.long, device=device)
    return torch.from_numpy(np.minimum(cap, unbounded)).to(device)


def _empty(values, token_caps, feature_caps, budget, scale, rtol, start) -> MixedSolution:
    """Nothing is selected: prices that price every positive score out (lambda on a zero budget)."""
    n, f = values.shape
    mask = torch.zeros(n, f, dtype=torch.bool, device=values.device)
    token_prices = torch.zeros(n, dtype=torch.float64, device=values.device)
    feature_prices = torch.zeros(f, dtype=torch.float64, device=values.device)
    budget_price = scale if budget == 0 else 0.0  # without positive scores, zero prices prove it
    certificate = check_certificate(values, mask, token_caps, feature_caps, budget, token_prices,
                                    feature_prices, budget_price, rtol * scale, rtol * scale)
    return MixedSolution(mask, 0.0, token_prices, feature_prices, budget_price, certificate, "auction", 0, 0,
                         time.perf_counter() - start)


def _fallback(values, constraints, device, certificate, rounds, phases, start) -> MixedSolution:
    """The exact CPU answer (scipy/HiGHS) in the same shape as the torch one."""
    exact = solve_lp(values.cpu().numpy(), constraints, backend="scipy")
    n, f = exact.mask.shape

    def prices(array, length):
        if array is None:
            return torch.zeros(length, dtype=torch.float64, device=device)
        return torch.as_tensor(array, dtype=torch.float64, device=device)

    return MixedSolution(
        torch.from_numpy(exact.mask).to(device), exact.objective, prices(exact.token_prices, n),
        prices(exact.feature_prices, f), float(exact.budget_price or 0.0), certificate, "scipy-fallback",
        rounds, phases, time.perf_counter() - start,
    )
