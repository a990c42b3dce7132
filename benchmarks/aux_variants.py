"""Which aux_zipf_loss deficit? Dead and under-used features per auxiliary loss, at equal L0 and FVU.

    .venv/bin/python benchmarks/aux_variants.py --jobs 2          # the grid (results/aux_variants_cpu.json)
    .venv/bin/python benchmarks/aux_variants.py --report          # README table from the JSON
    .venv/bin/python benchmarks/aux_variants.py --quick --out X   # seconds, synthetic data (a test runs it)

Protocol: SETTING (MiniLM layer-3 activations, the whole standard-library corpus, the last 10% held
out; TopK at the dead-feature setting of issue 13, chosen because TopK + aux_k_loss still ends with
dead features there), 3 seeds, every variant changes only the auxiliary loss, every run of a seed sees
the same batches, 1 thread per run. Recorded per run: the end-of-training dead fraction (no activation
in the last ``dead_tokens`` tokens) and under-used fraction (firing frequency over the last metrics
window below UNDER_USED_FACTOR x k / F), held-out FVU and L0 (eval mode; TopK's L0 is k), and for
rules with thresholds the held-out FVU calibrated to L0 = k (``calibrated``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from allocation.sae import TrainConfig, Trainer  # noqa: E402
from allocation.sae.atomic import write_file  # noqa: E402
from allocation.sae.metrics import UNDER_USED_FACTOR  # noqa: E402

SETTING = {
    "rule": "topk",
    "n_features": 4096,
    "k": 16,
    "tokens": 256_000,
    "batch_size": 1024,
    "lr": 2e-3,
    "dead_tokens": 25_600,
    "metrics_every": 25,
    "downstream": False,
    "data": "minilm",
    "data_options": {"n_tokens": 242_447},
}
"""The dead-feature setting (issue 13, step 1; see the README's aux_zipf_loss section for how it was chosen)."""

QUICK = {**SETTING, "n_features": 128, "k": 4, "tokens": 4096, "batch_size": 256, "dead_tokens": 512,
         "metrics_every": 4, "data": "synthetic", "data_options": {}}

ZIPF = {"aux": "zipf", "zipf_deficit": "absolute", "zipf_fit": False, "zipf_exclude_saturated": False,
        "zipf_under_used_only": False, "zipf_fill": True}
"""aux_zipf_loss before 0.2 (but water-filled capacities): every variant below changes it explicitly, so a change
of TrainConfig's defaults cannot change a variant."""

VARIANTS = {
    "none": {"aux": "none"},
    "aux_k": {"aux": "k"},
    "zipf_absolute": ZIPF,
    "zipf_relative": {**ZIPF, "zipf_deficit": "relative"},
    "zipf_log_ratio": {**ZIPF, "zipf_deficit": "log_ratio"},
    "zipf_exclude_saturated": {**ZIPF, "zipf_exclude_saturated": True},
    "zipf_fitted": {**ZIPF, "zipf_fit": True},
    "zipf_under_used": {**ZIPF, "zipf_deficit": "relative", "zipf_under_used_only": True},
}
"""Each changes only the auxiliary loss of SETTING (aux_zipf variants: one option from the absolute deficit;
zipf_under_used, added after the first five all ended with more dead features than no auxiliary loss: the
relative deficit on the under-used features only)."""

METRICS = ("dead_fraction", "under_used_fraction", "eval_fvu", "eval_l0", "calibrated_fvu", "train_fvu", "seconds")


def run_one(setting: dict, variant: str, options: dict, seed: int) -> dict:
    """Train one SAE (1 thread) and return its figures."""
    torch.set_num_threads(1)
    config = {**setting, **options, "seed": seed}
    data = config.pop("data")
    summary = Trainer(TrainConfig(**config), data).run()
    calibrated = summary.get("calibrated") or {}
    return {
        "variant": variant,
        "seed": seed,
        "options": options,
        "dead_fraction": summary["dead_fraction"],
        "under_used_fraction": summary["under_used_fraction"],
        "eval_fvu": summary["eval_fvu"],
        "eval_l0": summary["eval_l0"]["mean"],
        "calibrated_fvu": calibrated.get("eval_fvu"),
        "calibrated_l0": (calibrated.get("eval_l0") or {}).get("mean"),
        "train_fvu": summary["train_fvu"],
        "eval_never_fired_fraction": summary["eval_never_fired_fraction"],
        "seconds": summary["seconds"],
    }


def aggregate(runs: list) -> list:
    """Mean and std over seeds of every metric, one row per (rule, variant), in VARIANTS order."""
    rows = []
    keys = sorted({(r["rule"], r["variant"]) for r in runs},
                  key=lambda key: (key[0], list(VARIANTS).index(key[1]) if key[1] in VARIANTS else 99))
    for rule, variant in keys:
        group = [r for r in runs if r["rule"] == rule and r["variant"] == variant]
        row = {"rule": rule, "variant": variant, "options": group[0]["options"],
               "seeds": sorted(r["seed"] for r in group)}
        for metric in METRICS:
            values = [r[metric] for r in group if r.get(metric) is not None]
            if values:
                row[metric] = {"mean": statistics.mean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows.append(row)
    return rows


def choose_default(rows: list) -> Optional[dict]:
    """The aux_zipf variant with the fewest dead + under-used features among those whose held-out FVU is
    within one std (the larger of the two) of aux_k's; None without aux_k or zipf rows."""
    by_name = {row["variant"]: row for row in rows if row["rule"] == "topk"}
    reference = by_name.get("aux_k")
    candidates = [row for name, row in by_name.items() if name.startswith("zipf_")]
    if reference is None or not candidates:
        return None

    def fvu_ok(row: dict) -> bool:
        slack = max(row["eval_fvu"]["std"], reference["eval_fvu"]["std"])
        return row["eval_fvu"]["mean"] <= reference["eval_fvu"]["mean"] + slack

    def badness(row: dict) -> float:
        return row["dead_fraction"]["mean"] + row["under_used_fraction"]["mean"]

    eligible = [row for row in candidates if fvu_ok(row)] or candidates
    best = min(eligible, key=badness)
    return {"variant": best["variant"], "options": best.get("options"), "fvu_within_aux_k_noise": fvu_ok(best),
            "beats_aux_k": badness(best) < badness(reference) and fvu_ok(best)}


def _fmt(row: dict, metric: str, scale: float = 1.0, digits: int = 2) -> str:
    if metric not in row:
        return "-"
    value = row[metric]
    return f"{value['mean'] * scale:.{digits}f} ± {value['std'] * scale:.{digits}f}"


START, END = "<!-- aux-variants:start -->", "<!-- aux-variants:end -->"


def render(payload: dict) -> str:
    """The README table (every figure read from the results file)."""
    setting = payload["setting"]
    rows = aggregate(payload["runs"])
    choice = choose_default(rows)
    lines = [
        f"Generated by `benchmarks/aux_variants.py --report` from `benchmarks/results/aux_variants_cpu.json`: "
        f"{setting['data']} activations ({setting['data_options'].get('n_tokens', 'default')} tokens, last 10% "
        "held out), "
        f"{setting['rule']} k = {setting['k']}, F = {setting['n_features']}, {setting['tokens']} training tokens, "
        f"batch {setting['batch_size']}, lr {setting['lr']:g}, dead after {setting['dead_tokens']} tokens without "
        f"an activation; mean ± std over the seeds listed (1 thread per run, on a 2-core machine shared with other "
        f"jobs: seconds vary with its load). Dead and under-used (firing below {UNDER_USED_FACTOR:g} x k / F over "
        "the last "
        f"{setting['metrics_every'] * setting['batch_size']} training tokens) in % of F at the end of training; "
        "held-out FVU in eval mode at L0 = k (TopK: exactly k per token).",
        "",
        "| rule | auxiliary loss | seeds | dead % | under-used % | held-out FVU | held-out L0 | seconds per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fvu = _fmt(row, "eval_fvu", digits=4)
        if "calibrated_fvu" in row:
            fvu += f" (calibrated to L0 = k: {_fmt(row, 'calibrated_fvu', digits=4)})"
        seeds = ", ".join(str(seed) for seed in row["seeds"])
        lines.append(f"| {row['rule']} | {row['variant']} | {seeds} | {_fmt(row, 'dead_fraction', 100)} "
                     f"| {_fmt(row, 'under_used_fraction', 100)} | {fvu} | {_fmt(row, 'eval_l0', digits=1)} "
                     f"| {_fmt(row, 'seconds', digits=0)} |")
    if choice is not None:
        verdict = "beats aux_k_loss" if choice["beats_aux_k"] else "does not beat aux_k_loss"
        lines += ["", f"Fewest dead + under-used (the under-used include the dead) among the aux_zipf variants "
                      f"with held-out FVU within noise of aux_k: **{choice['variant']}** ({verdict} on dead + "
                      f"under-used at no FVU cost)." + _comparison(rows)]
    return "\n".join(lines) + "\n"


def _comparison(rows: list) -> str:
    """A sentence counting the aux_zipf variants that end with more dead features than aux_k / no aux loss."""
    by_name = {row["variant"]: row for row in rows if row["rule"] == "topk"}
    zipf = [row for name, row in by_name.items() if name.startswith("zipf_")]
    parts = []
    for name in ("aux_k", "none"):
        if name in by_name:
            dead = by_name[name]["dead_fraction"]["mean"]
            worse = sum(row["dead_fraction"]["mean"] > dead for row in zipf)
            parts.append(f"{worse} of {len(zipf)} end with more dead features than {name} ({100 * dead:.2f}%)")
    return f" Of the aux_zipf variants, {' and '.join(parts)}." if parts else ""


def record_run(path: Path, setting: dict, run: dict, seconds: float) -> dict:
    """Add ``run`` to the results file (under a lock: several invocations may share it) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = json.loads(path.read_text()) if path.exists() else {}
        key = (run["rule"], run["variant"], run["seed"])
        runs = [r for r in payload.get("runs", []) if (r["rule"], r["variant"], r["seed"]) != key] + [run]
        rows = aggregate(runs)
        payload = {"benchmark": "aux_zipf_loss variants", "command": " ".join(sys.argv),
                   "machine": _common.machine(torch.device("cpu")), "setting": setting, "runs": runs,
                   "rows": rows, "default": choose_default(rows),
                   "train_seconds": payload.get("train_seconds", 0.0) + seconds}
        write_file(path, (json.dumps(payload, indent=1) + "\n").encode())
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default="topk", help="comma-separated rules (e.g. topk,mutual-choice)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="a tiny synthetic grid in seconds (for tests)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/aux_variants_cpu.json; runs already "
                             "in it are kept and not trained again)")
    parser.add_argument("--report", action="store_true", help="only rewrite the README table from the results")
    args = parser.parse_args(argv)
    path = args.out or _common.RESULTS / "aux_variants_cpu.json"
    if args.report:
        text = render(json.loads(path.read_text()))
        print(text)
        print("README updated" if _common.write_marked_section(text, START, END) else "README has no markers")
        return 0
    setting = QUICK if args.quick else SETTING
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    payload = json.loads(path.read_text()) if path.exists() else {}
    if payload.get("setting", setting) != setting:
        parser.error(f"{path} holds runs of another setting; pass another --out")
    done = {(r["rule"], r["variant"], r["seed"]) for r in payload.get("runs", [])}
    todo = [(rule, variant, int(seed)) for seed in args.seeds.split(",") for rule in args.rules.split(",")
            for variant in args.variants.split(",") if (rule, variant, int(seed)) not in done]  # seed-major
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, {**setting, "rule": rule}, variant, VARIANTS[variant], seed): rule
                   for rule, variant, seed in todo}
        for future in futures:
            run = {"rule": futures[future], **future.result()}
            record_run(path, setting, run, run["seconds"])
            print(f"{run['rule']:>14} {run['variant']:>24} seed {run['seed']}: dead {run['dead_fraction']:.4f} "
                  f"under-used {run['under_used_fraction']:.4f} FVU {run['eval_fvu']:.4f} "
                  f"({run['seconds']:.0f} s)", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
