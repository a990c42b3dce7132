"""``allocation bench``: time the TopK, Mutual Choice and Feature Choice masks on this machine."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from .._validate import check_device, positive_int
from ..errors import AllocationError
from ..timing import time_kernels
from ._shapes import parse_shape

DTYPES = ("float32", "float64", "float16", "bfloat16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the allocation rules on this machine (CPU or GPU)",
        description="Time per call of the TopK, Mutual Choice (B = k n) and Feature Choice (m = k n / F) "
        "masks on a standard normal N x F matrix, against per-row torch.topk, the naive baselines and "
        "the memory-bandwidth floor; methods are interleaved and ratios are medians of per-repeat ratios. "
        "The repository's benchmarks/ scripts run the full suite.",
    )
    parser.add_argument("--size", default="4096x32768", metavar="NxF", help="tokens x features (default 4096x32768)")
    parser.add_argument("--k", type=int, default=64, help="features per token (default 64)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (default 5)")
    parser.add_argument("--naive-repeats", type=int, default=1,
                        help="timed calls of the slow naive baselines; 0 skips them (default 1)")
    parser.add_argument("--zipf-exponent", type=float, default=1.0, metavar="S",
                        help="also Feature Choice with Zipf capacities m_j ~ j^-S summing to k n (default 1)")
    parser.add_argument("--no-zipf", action="store_true", help="skip the Zipf-capacity Feature Choice")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    n_tokens, n_features = parse_shape(args.size, "--size")
    if not 1 <= args.k <= n_features:
        raise AllocationError(f"--k must be in [1, n_features={n_features}], got {args.k}")
    if args.repeats < 1 or args.naive_repeats < 0:
        raise AllocationError("--repeats must be >= 1 and --naive-repeats >= 0")
    device = check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(positive_int(args.threads, "--threads"))
    if not args.zipf_exponent >= 0:
        raise AllocationError(f"--zipf-exponent must be >= 0, got {args.zipf_exponent}")
    result = time_kernels(n_tokens, n_features, args.k, dtype=getattr(torch, args.dtype), device=device,
                          repeats=args.repeats, naive_repeats=args.naive_repeats,
                          zipf_exponent=None if args.no_zipf else args.zipf_exponent)
    result["device"] = str(device)
    result["threads"] = torch.get_num_threads()
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def report(result: dict) -> str:
    """The result as a table: ms per call, and each rule's ratio to per-row torch.topk and the floor."""
    seconds = result["seconds"]
    floor = result["floor_seconds"]
    lines = [
        f"{result['n_tokens']} x {result['n_features']} {result['dtype']} on {result['device']} "
        f"({result['threads']} threads), k = {result['k']}, B = {result['budget']}, m = {result['per_feature']}; "
        f"median of {result['repeats']} interleaved calls (naive baselines: {result['naive_repeats']}); ratios are "
        "medians of per-repeat ratios where both ran every repeat",
        "",
        f"{'method':<34}{'ms/call':>10}{'vs row topk':>13}{'vs floor':>10}",
    ]
    rows = [
        ("per-row torch.topk (no mask)", "row_topk"),
        ("allocation.topk (TopK mask)", "topk"),
        ("allocation.mutual_choice", "mutual_choice"),
        ("allocation.feature_choice", "feature_choice"),
        ("allocation.feature_choice, Zipf m", "feature_choice_zipf"),
        ("flatten().topk(B), naive MC", "naive_mc"),
        ("topk(m, dim=0), naive FC", "naive_fc"),
        ("topk(max m, dim=0), naive Zipf FC", "naive_fc_zipf"),
        ("torch.zeros bool mask", "zeros_mask"),
    ]
    for label, key in rows:
        if key in seconds:
            versus_topk = _ratio(result["runs"][key], result["runs"]["row_topk"])
            lines.append(f"{label:<34}{seconds[key] * 1e3:>10.2f}{versus_topk:>12.2f}x{seconds[key] / floor:>9.1f}x")
    lines.append(f"{'bandwidth floor (bytes(S) / copy)':<34}{floor * 1e3:>10.2f}")
    return "\n".join(lines)


def _ratio(times: list[float], reference: list[float]) -> float:
    """Median of per-repeat ratios when both ran every repeat (interleaved), else ratio of medians."""
    if len(times) == len(reference):
        return statistics.median(a / b for a, b in zip(times, reference, strict=True))
    return statistics.median(times) / statistics.median(reference)
