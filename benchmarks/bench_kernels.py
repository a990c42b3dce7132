"""Allocation kernels: TopK, Feature Choice, Mutual Choice masks vs naive topk and the bandwidth floor.

    .venv/bin/python benchmarks/bench_kernels.py                  # CPU, fp32, all sizes
    .venv/bin/python benchmarks/bench_kernels.py --device cuda    # + bf16 on a GPU

For n x F in {1024, 4096} x {4096, 16384, 32768} (standard normal scores, k = 64 per token): the
median time per call of

- ``row_topk``: ``scores.topk(k, dim=1)`` alone (no mask), the reference the targets name;
- ``topk``: ``allocation.topk`` (TopK mask, with input checks);
- ``mutual_choice``: ``allocation.mutual_choice`` with budget B = k n;
- ``feature_choice``: ``allocation.feature_choice`` with m = k n / F per feature;
- ``feature_choice_zipf``: the same with Zipf capacities m_j ~ 1 / j summing to about k n (each in
  [1, n]); its naive baseline ``naive_fc_zipf`` (topk of the largest m per column) is timed once;
- ``naive_mc``: ``scores.flatten().topk(B)`` then scatter; ``naive_fc``: ``scores.topk(m, dim=0)`` then
  scatter (the baselines the issue names);
- ``copy``: ``out.copy_(scores)`` into a preallocated tensor: the memory bandwidth is
  (bytes read + bytes written) / time; the floor of a rule is bytes(scores) / bandwidth;
- ``zeros_mask``: ``torch.zeros(n, F, dtype=bool)``, the fresh output every mask-returning rule
  allocates (row_topk returns no mask). On CPU a large fresh tensor page-faults on first touch,
  so this alone can exceed the floor; it is reported to show how much of a rule's time it is.

Every cell's methods are interleaved in one process; ratios to row_topk, topk and the floor are
medians of per-repeat ratios; the naive baselines (seconds each at the largest size) are timed
``--naive-repeats`` times after their correctness check, and compared by ratio of medians.
The measurement itself is ``allocation.timing.time_kernels`` (also behind ``allocation bench``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from allocation.timing import time_kernels  # noqa: E402

SIZES = [(n, f) for n in (1024, 4096) for f in (4096, 16384, 32768)]
K = 64


def bench_cell(n: int, f: int, dtype: torch.dtype, device: torch.device, repeats: int,
               naive_repeats: int) -> dict:
    """One size and dtype: ``allocation.timing.time_kernels`` (naive baselines always timed)."""
    return time_kernels(n, f, K, dtype=dtype, device=device, repeats=repeats,
                        naive_repeats=max(1, naive_repeats))


def targets(cells: list[dict]) -> list[dict]:
    """The issue's targets at 4096 x 32768 fp32: measured ratio and whether it is met."""
    wanted = (4096, 32768, "float32")
    cell = next((c for c in cells if (c["n_tokens"], c["n_features"], c["dtype"]) == wanted), None)
    if cell is None:
        return []
    r = cell["ratios"]
    rows = [
        ("Mutual Choice mask <= 1.5x per-row torch.topk", r["mc_vs_row_topk"], r["mc_vs_row_topk"] <= 1.5),
        ("Feature Choice mask <= 1.5x per-row torch.topk", r["fc_vs_row_topk"], r["fc_vs_row_topk"] <= 1.5),
        ("Mutual Choice >= 2x faster than flatten().topk", r["naive_mc_vs_mc"], r["naive_mc_vs_mc"] >= 2),
        ("Feature Choice >= 2x faster than topk(dim=0)", r["naive_fc_vs_fc"], r["naive_fc_vs_fc"] >= 2),
        ("Mutual Choice <= 3x bandwidth floor", r["mc_vs_floor"], r["mc_vs_floor"] <= 3),
        ("Feature Choice <= 3x bandwidth floor", r["fc_vs_floor"], r["fc_vs_floor"] <= 3),
        ("TopK <= 3x bandwidth floor", r["topk_vs_floor"], r["topk_vs_floor"] <= 3),
    ]
    return [{"target": name, "ratio": value, "met": bool(met)} for name, value, met in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (after 1 warm-up)")
    parser.add_argument("--sizes", default=",".join(f"{n}x{f}" for n, f in SIZES))
    parser.add_argument("--dtypes", default=None, help="default: float32 (CPU), float32,bfloat16 (CUDA)")
    parser.add_argument("--naive-repeats", type=int, default=3,
                        help="timed calls of the slow naive baselines (their check call is the warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--name", default="kernels", help="result file stem: results/<name>_<device>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtypes or ("float32,bfloat16" if device.type == "cuda" else "float32")
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    cells = []
    for dtype_name in dtypes.split(","):
        for n, f in sizes:
            cell = bench_cell(n, f, getattr(torch, dtype_name), device, args.repeats, args.naive_repeats)
            cells.append(cell)
            s, r = cell["seconds"], cell["ratios"]
            print(f"{n:>5} x {f:<6} {dtype_name:<9} row_topk {s['row_topk'] * 1e3:7.1f} ms  "
                  f"topk {s['topk'] * 1e3:7.1f}  MC {s['mutual_choice'] * 1e3:7.1f} "
                  f"(naive x{r['naive_mc_vs_mc']:.1f})  "
                  f"FC {s['feature_choice'] * 1e3:7.1f} (naive x{r['naive_fc_vs_fc']:.1f})  "
                  f"FC Zipf {s['feature_choice_zipf'] * 1e3:7.1f} (naive x{r['naive_fc_zipf_vs_fc_zipf']:.1f})  "
                  f"floor {cell['floor_seconds'] * 1e3:6.1f} ms  zeroed mask {s['zeros_mask'] * 1e3:6.1f} ms",
                  flush=True)
    payload = {
        "benchmark": "allocation kernels",
        "command": "benchmarks/bench_kernels.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
        "machine": _common.machine(device),
        "caveat": _common.LOAD_CAVEAT,
        "targets": targets(cells),
        "cells": cells,
    }
    path = _common.write_result(args.name, device, payload)
    for row in payload["targets"]:
        print(f"{'met' if row['met'] else 'NOT met':>8}  {row['ratio']:6.2f}  {row['target']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
