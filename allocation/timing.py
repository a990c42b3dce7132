"""Timing the allocation rules on this machine: interleaved calls, medians, per-repeat ratios.

``time_kernels(n, F, k)`` times, on one standard normal (n, F) matrix, the TopK / Mutual Choice /
Feature Choice masks (budget B = k n, m = k n / F per feature) against per-row ``torch.topk``, the
naive baselines (``flatten().topk(B)``, ``topk(m, dim=0)``), a zeroed bool mask and a plain copy
(the bandwidth floor = bytes(S) / copy bandwidth). Methods run interleaved (A, B, C, A, B, C, ...)
so that background load spreads evenly; ratios are medians of per-repeat ratios. Used by
``allocation bench`` and ``benchmarks/bench_kernels.py``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Union

import torch

from . import rules, zipf
from ._selection import select_top_plain

Device = Union[str, torch.device]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA) so that wall time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(function: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronised."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_runs(methods: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of every method, interleaved (A, B, C, A, B, C, ...) after warm-up."""
    for function in methods.values():
        for _ in range(warmup):
            function()
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, function in methods.items():
            runs[name].append(time_once(function, device))
    return runs


def naive_mutual_choice(scores: torch.Tensor, total: int) -> torch.Tensor:
    """Global top-B by ``flatten().topk``, then scatter (positives only)."""
    values, index = scores.flatten().topk(total, sorted=False)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    return mask.scatter_(0, index, values > 0).view_as(scores)


def naive_feature_choice(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Per-column top-m by ``topk(dim=0)``, then scatter (positives only)."""
    values, index = scores.topk(m, dim=0, sorted=False)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(0, index, values > 0)


def zipf_capacities(n_tokens: int, n_features: int, k: int, exponent: float) -> torch.Tensor:
    """Zipf-shaped capacities m_j ~ j^-s summing to k n (``allocation.zipf``), raised to at least 1 (every
    feature selects: no empty columns in the timings)."""
    return zipf.zipf_capacities(n_tokens, n_features, k * n_tokens, exponent).clamp_(min=1)


def time_kernels(n_tokens: int, n_features: int, k: int, *, dtype: torch.dtype = torch.float32,
                 device: Device = "cpu", repeats: int = 5, naive_repeats: int = 3, seed: int = 0,
                 zipf_exponent: Optional[float] = 1.0) -> dict:
    """Seconds per call of every method on one (n_tokens, n_features) matrix, and their ratios.

    ``naive_repeats = 0`` skips the naive baselines (seconds each at 4096 x 32768 on a CPU).
    ``zipf_exponent``: also Feature Choice with ``zipf_capacities`` (None skips it); its naive
    baseline (``topk(max m, dim=0)``, ten seconds at 4096 x 32768) is timed once, by its check.
    Raises AssertionError if a fast rule and its naive baseline select different values.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_tokens, n_features, generator=generator).to(device=device, dtype=dtype)
    total, m = k * n_tokens, max(1, k * n_tokens // n_features)
    out = torch.empty_like(scores)
    methods = {
        "copy": lambda: out.copy_(scores),
        "zeros_mask": lambda: torch.zeros(n_tokens, n_features, dtype=torch.bool, device=device),
        "row_topk": lambda: scores.topk(k, dim=1, sorted=False),
        "topk": lambda: rules.topk(scores, k),
        "mutual_choice": lambda: rules.mutual_choice(scores, total),
        "feature_choice": lambda: rules.feature_choice(scores, m),
    }
    if zipf_exponent is not None:
        capacities = zipf_capacities(n_tokens, n_features, k, zipf_exponent).to(device)
        methods["feature_choice_zipf"] = lambda: rules.feature_choice(scores, capacities)
    runs = interleaved_runs(methods, device, repeats)
    naive = min(repeats, naive_repeats)
    if naive > 0:
        _check_same_values(scores, total, m)  # also the baselines' warm-up
        baselines = {"naive_mc": lambda: naive_mutual_choice(scores, total),
                     "naive_fc": lambda: naive_feature_choice(scores, m)}
        runs.update(interleaved_runs(baselines, device, naive, warmup=0))
        if zipf_exponent is not None:
            runs["naive_fc_zipf"] = [_time_and_check_zipf(scores, capacities, device)]
    seconds = {name: statistics.median(times) for name, times in runs.items()}
    bytes_read = scores.numel() * scores.element_size()
    floor = [bytes_read / (2 * bytes_read / t) for t in runs["copy"]]  # the copy reads and writes S

    def ratio(numerator: str, denominator: list[float]) -> float:
        return statistics.median(a / b for a, b in zip(runs[numerator], denominator, strict=True))

    ratios = {
        "mc_vs_row_topk": ratio("mutual_choice", runs["row_topk"]),
        "fc_vs_row_topk": ratio("feature_choice", runs["row_topk"]),
        "mc_vs_topk_rule": ratio("mutual_choice", runs["topk"]),
        "fc_vs_topk_rule": ratio("feature_choice", runs["topk"]),
        "topk_vs_floor": ratio("topk", floor),
        "mc_vs_floor": ratio("mutual_choice", floor),
        "fc_vs_floor": ratio("feature_choice", floor),
        "zeros_mask_vs_floor": ratio("zeros_mask", floor),
    }
    if naive > 0:
        ratios["naive_mc_vs_mc"] = seconds["naive_mc"] / seconds["mutual_choice"]
        ratios["naive_fc_vs_fc"] = seconds["naive_fc"] / seconds["feature_choice"]
        if zipf_exponent is not None:
            ratios["naive_fc_zipf_vs_fc_zipf"] = seconds["naive_fc_zipf"] / seconds["feature_choice_zipf"]
    if zipf_exponent is not None:
        ratios["fc_zipf_vs_row_topk"] = ratio("feature_choice_zipf", runs["row_topk"])
    return {
        "n_tokens": n_tokens, "n_features": n_features, "dtype": str(dtype).replace("torch.", ""), "k": k,
        "budget": total, "per_feature": m, "repeats": repeats, "naive_repeats": naive,
        "zipf_exponent": zipf_exponent,
        "seconds": seconds, "runs": runs,
        "bandwidth_gb_s": statistics.median(2 * bytes_read / t for t in runs["copy"]) / 1e9,
        "floor_seconds": statistics.median(floor),
        "ratios": ratios,
    }


def _check_same_values(scores: torch.Tensor, total: int, m: int) -> None:
    """The fast rules and the naive baselines select the same values (timing wrong code is void)."""
    pairs = ((rules.mutual_choice(scores, total), naive_mutual_choice(scores, total)),
             (rules.feature_choice(scores, m), naive_feature_choice(scores, m)))
    for fast, naive in pairs:
        if not _same_selected_values(scores, fast, naive):
            raise AssertionError("fast rule and naive baseline disagree: not timing a wrong kernel")


def _time_and_check_zipf(scores: torch.Tensor, capacities: torch.Tensor, device: torch.device) -> float:
    """Seconds of one naive Zipf Feature Choice (per-column topk of the largest m), checked against the rule."""
    result = {}
    seconds = time_once(lambda: result.setdefault("mask", select_top_plain(scores, capacities, 0)), device)
    if not _same_selected_values(scores, rules.feature_choice(scores, capacities), result["mask"]):
        raise AssertionError("Zipf Feature Choice and its naive baseline disagree: not timing a wrong kernel")
    return seconds


def _same_selected_values(scores: torch.Tensor, mask: torch.Tensor, other: torch.Tensor) -> bool:
    """Both masks select the same multiset of scores (so the same objective; ties may differ)."""
    return torch.equal(scores[mask].double().sort().values, scores[other].double().sort().values)
