"""Time the exact torch solver for mixed caps against scipy/HiGHS; write JSON to benchmarks/results/.

    .venv/bin/python benchmarks/bench_mixed_solver.py                 # CPU, 3 repeats
    .venv/bin/python benchmarks/bench_mixed_solver.py --device cuda   # the torch solver on a GPU

Scores are standard normal (seed 0 per size), caps k = 32 per token and m = ceil(2 k n / F) per
feature, without a budget and with B = k n / 2. Each cell is the median wall time of ``--repeats``
runs (scipy/HiGHS: ``--scipy-repeats``, default 1, since it takes tens of seconds); the objectives
of both solvers are recorded with their difference, and whether the torch answer was certified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from allocation import Constraints, solve
from allocation.exact_torch import CertificateWarning, solve_mixed

SIZES = ((64, 256), (256, 1024), (256, 4096), (512, 4096))
PER_TOKEN = 32
RESULTS = Path(__file__).resolve().parent / "results"


def time_torch(scores: torch.Tensor, constraints: Constraints, repeats: int):
    """Median seconds of solve_mixed (synchronised on CUDA) and the last solution."""
    times, solution = [], None
    for _ in range(repeats):
        if scores.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CertificateWarning)
            solution = solve_mixed(scores, constraints)
        if scores.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, solution, [str(w.message) for w in caught]


def time_scipy(scores, constraints: Constraints, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = solve(scores, constraints, backend="scipy")
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device for the torch solver (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the torch solver per cell")
    parser.add_argument("--scipy-repeats", type=int, default=1, help="runs of scipy/HiGHS per cell")
    parser.add_argument("--sizes", default=",".join(f"{n}x{f}" for n, f in SIZES),
                        help="comma-separated n x F sizes, e.g. 64x256,256x1024")
    parser.add_argument("--no-scipy", action="store_true", help="skip the scipy/HiGHS reference")
    parser.add_argument("--output", default=None,
                        help="JSON path (default results/mixed_solver_<device>.json)")
    args = parser.parse_args()

    device = torch.device(args.device)
    sizes = [tuple(int(x) for x in size.lower().split("x")) for size in args.sizes.split(",")]
    rows = []
    for n, f in sizes:
        generator = torch.Generator().manual_seed(0)
        cpu_scores = torch.randn(n, f, generator=generator)
        scores = cpu_scores.to(device)
        per_feature = math.ceil(2 * PER_TOKEN * n / f)
        for total in (None, PER_TOKEN * n // 2):
            constraints = Constraints(per_token=PER_TOKEN, per_feature=per_feature, total=total)
            solve_mixed(scores[:8, :32], constraints)  # warm up kernels / allocator
            torch_median, torch_times, solution, warned = time_torch(scores, constraints, args.repeats)
            row = {
                "n_tokens": n, "n_features": f, "per_token": PER_TOKEN, "per_feature": per_feature,
                "total": total, "torch_seconds": torch_median, "torch_runs": torch_times,
                "torch_objective": solution.objective, "torch_method": solution.method,
                "certified": bool(solution.certificate is not None and solution.certificate.ok),
                "duality_gap": solution.certificate.gap if solution.certificate else None,
                "gap_tolerance": solution.certificate.gap_tolerance if solution.certificate else None,
                "rounds": solution.rounds, "phases": solution.phases, "warnings": warned,
            }
            if not args.no_scipy:
                scipy_median, scipy_times, result = time_scipy(cpu_scores.numpy(), constraints,
                                                               args.scipy_repeats)
                row.update({
                    "scipy_seconds": scipy_median, "scipy_runs": scipy_times,
                    "scipy_objective": result.objective,
                    "objective_difference": solution.objective - result.objective,
                    "speedup": scipy_median / torch_median,
                })
            rows.append(row)
            print(_line(row), flush=True)

    target = [r for r in rows if r["n_tokens"] * r["n_features"] >= 256 * 4096 and "speedup" in r]
    summary = {
        "benchmark": "exact mixed-cap solver: torch auction + certificate vs scipy/HiGHS (IPM, presolve off)",
        "command": "benchmarks/bench_mixed_solver.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "torch_threads_outside_solver": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "platform": platform.platform(),
        "target_met": bool(target) and all(r["speedup"] > 1 and r["certified"] for r in target),
        "target": "torch faster than scipy/HiGHS from 256 x 4096 up, same objective",
        "rows": rows,
    }
    output = Path(args.output) if args.output else RESULTS / f"mixed_solver_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"target met: {summary['target_met']}; wrote {output}")
    return 0


def _line(row) -> str:
    budget = "none" if row["total"] is None else str(row["total"])
    text = (f"{row['n_tokens']:>4} x {row['n_features']:<5} B={budget:<5} "
            f"torch {row['torch_seconds']:8.3f} s ({row['torch_method']}, {row['rounds']} rounds, "
            f"certified={row['certified']})")
    if "scipy_seconds" in row:
        text += (f"  scipy {row['scipy_seconds']:8.3f} s  speedup {row['speedup']:6.1f}x  "
                 f"objective diff {row['objective_difference']:.3g}")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
