"""Exact solvers: time and peak memory vs size for scipy/HiGHS, cvxpy and the torch mixed-cap solver.

    .venv/bin/python benchmarks/bench_solvers.py              # cap 10 s per solve
    .venv/bin/python benchmarks/bench_solvers.py --cap 60     # the issue's protocol (slower)

Scores are standard normal (seed 0). Three constraint families, k = 8:
TopK (k per token), Mutual Choice (budget B = k n) and mixed caps (k per token AND
m = ceil(2 k n / F) per feature, the case that needs a real solver). Each solve runs in a forked
child process: its wall time, and its peak resident memory above the child's starting point
(ru_maxrss). Sizes grow 4x in entries (n x 4n) until a solve exceeds ``--cap`` seconds (the child is
killed and the size is recorded as "over the cap") or fails; larger sizes are then skipped.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from allocation import Constraints, solve  # noqa: E402

SIZES = [(32, 128), (64, 256), (128, 512), (256, 1024), (512, 2048), (1024, 4096), (2048, 8192), (4096, 16384),
         (8192, 32768)]
K = 8
KINDS = ("topk", "mutual_choice", "mixed")
BACKENDS = ("scipy", "cvxpy", "torch")


def constraints_for(kind: str, n: int, f: int) -> Constraints:
    if kind == "topk":
        return Constraints.topk(K)
    if kind == "mutual_choice":
        return Constraints.mutual_choice(K * n)
    return Constraints(per_token=K, per_feature=math.ceil(2 * K * n / f))


def _solve_in_child(backend: str, kind: str, n: int, f: int, pipe) -> None:
    """Child process: build the problem, solve once, send back seconds, peak memory and objective."""
    try:
        scores = np.random.default_rng(0).standard_normal((n, f))
        constraints = constraints_for(kind, n, f)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        if backend == "torch":
            from allocation.exact_torch import solve_mixed

            objective = solve_mixed(torch.from_numpy(scores), constraints).objective
        else:
            objective = solve(scores, constraints, backend=backend).objective
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pipe.send({"status": "ok", "seconds": seconds, "peak_mb": (peak - before) / 1024,
                   "objective": float(objective)})
    except Exception as error:  # reported, not raised: the benchmark records the failure
        pipe.send({"status": "error", "error": f"{type(error).__name__}: {error}",
                   "trace": traceback.format_exc(limit=3)})


def run_one(backend: str, kind: str, n: int, f: int, cap: float) -> dict:
    """One solve in a forked child, killed after ``cap`` seconds (plus start-up grace)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_solve_in_child, args=(backend, kind, n, f, send))
    start = time.perf_counter()
    child.start()
    result = None
    if receive.poll(cap + 5.0):
        result = receive.recv()
    child.join(timeout=1.0)
    if child.is_alive():
        child.kill()
        child.join()
    if result is None:
        return {"status": "over_cap", "seconds": None, "wall_until_killed": time.perf_counter() - start}
    if result["status"] == "ok" and result["seconds"] > cap:
        result["status"] = "over_cap"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=10.0, help="seconds per solve before giving up")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--name", default="solvers", help="result file stem: results/<name>_cpu.json")
    args = parser.parse_args()
    torch_available = _has_torch_solver()
    _import_backends()  # lazy imports happen here, once, not inside the timed solves
    rows = []
    for kind in args.kinds.split(","):
        for backend in args.backends.split(","):
            if backend == "torch" and not torch_available:
                print("allocation.exact_torch not found: skipping the torch solver")
                continue
            for n, f in SIZES:
                row = {"kind": kind, "backend": backend, "n_tokens": n, "n_features": f, "k": K}
                row.update(run_one(backend, kind, n, f, args.cap))
                rows.append(row)
                ok = row["status"] == "ok"
                shown = f"{row['seconds']:8.3f} s {row['peak_mb']:7.0f} MB" if ok else row["status"]
                print(f"{kind:<14} {backend:<6} {n:>5} x {f:<5} {shown}", flush=True)
                if row["status"] != "ok":
                    break
    _check_objectives(rows)
    payload = {
        "benchmark": "exact solvers",
        "command": "benchmarks/bench_solvers.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "cap_seconds": args.cap,
        "machine": _common.machine(torch.device("cpu")),
        "caveat": _common.LOAD_CAVEAT,
        "largest_within_cap": _largest(rows),
        "rows": rows,
    }
    path = _common.write_result(args.name, torch.device("cpu"), payload)
    print(f"wrote {path}")
    return 0


def _import_backends() -> None:
    """Import every backend's modules in the parent, so forked children start with them loaded."""
    import cvxpy  # noqa: F401
    import scipy.optimize  # noqa: F401

    import allocation.exact.cvxpy_backend  # noqa: F401
    import allocation.exact.scipy_backend  # noqa: F401


def _has_torch_solver() -> bool:
    try:
        import allocation.exact_torch  # noqa: F401
    except ImportError:
        return False
    return True


def _check_objectives(rows: list[dict]) -> None:
    """Backends that solved the same problem must agree on the optimum (else the timing is void)."""
    by_problem: dict = {}
    for row in rows:
        if row["status"] == "ok":
            by_problem.setdefault((row["kind"], row["n_tokens"], row["n_features"]), []).append(row)
    for same in by_problem.values():
        reference = same[0]["objective"]
        for row in same:
            row["objective_gap"] = row["objective"] - reference
            if abs(row["objective_gap"]) > 1e-6 * (1 + abs(reference)):
                size = f"{row['n_tokens']}x{row['n_features']}"
                raise AssertionError(f"solvers disagree on {row['kind']} {size}")


def _largest(rows: list[dict]) -> dict:
    """Per kind and backend, the largest n x F solved within the cap."""
    largest: dict = {}
    for row in rows:
        if row["status"] == "ok":
            largest.setdefault(row["kind"], {})[row["backend"]] = f"{row['n_tokens']}x{row['n_features']}"
    return largest


if __name__ == "__main__":
    raise SystemExit(main())
