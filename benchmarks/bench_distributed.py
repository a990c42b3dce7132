"""Data-parallel training on 1 vs 2 CPU processes (gloo): tokens/s and communication bytes per step.

    .venv/bin/python benchmarks/bench_distributed.py            # d_in 128, F 4096, k 32, batch 1024
    .venv/bin/python benchmarks/bench_distributed.py --quick    # tiny sizes, a few steps (tested)

For each rule, ``Trainer.train_step`` under ``allocation_scope='global'`` on 2 ranks (each its half of
every global batch, one thread each) and in one process on the whole batch (one thread), no
auxiliary loss. Per step, measured on rank 0: the bytes it sent in the allocation's, the prices'
and the losses' collectives (``Communicator.bytes_sent``), of them the bytes of ``global_allocate``
alone, and the gradient bytes DDP all-reduced; against the n_local x F scores an all-gather of the
batch's affinities would send. Step times: median over the timed steps after warm-up; tokens/s =
global batch / that median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from allocation.distributed import global_allocate, run_local_ranks  # noqa: E402

RULES = {
    "topk": {"rule": "topk"},
    "feature-choice": {"rule": "feature-choice"},
    "feature-choice-zipf": {"rule": "feature-choice", "zipf_capacities": 1.0},
    "mutual-choice": {"rule": "mutual-choice"},
}


def _trainer(options: dict, args):
    from allocation.sae import TrainConfig, Trainer

    config = TrainConfig(**options, k=args.k, n_features=args.n_features, batch_size=args.batch_size,
                         tokens=args.batch_size * (args.steps + args.warmup), aux="none", seed=0,
                         b_dec_sample=args.batch_size, data_options={"d_in": args.d_in})
    return Trainer(config, "synthetic")


def _timed_steps(trainer, args) -> dict:
    """Warm-up, then the timed steps: median seconds and per-step bytes (rank 0's view)."""
    cfg = trainer.config
    batches = trainer.source.batches(cfg.batch_size, seed=cfg.seed)
    rows = trainer.sae.scope.rows if trainer.comm is not None else (lambda batch: batch)
    for _ in range(args.warmup):
        trainer.train_step(rows(next(batches)))
    sent, gradients = (trainer.comm.bytes_sent if trainer.comm else 0), trainer.gradient_bytes[0]
    seconds = []
    for _ in range(args.steps):
        batch = rows(next(batches))
        start = time.perf_counter()
        trainer.train_step(batch)
        seconds.append(time.perf_counter() - start)
    result = {"step_seconds_median": statistics.median(seconds),
              "tokens_per_second": cfg.batch_size / statistics.median(seconds)}
    if trainer.comm is not None:
        comm = trainer.comm
        result["bytes_per_step"] = (comm.bytes_sent - sent) / args.steps
        result["gradient_bytes_per_step"] = (trainer.gradient_bytes[0] - gradients) / args.steps
        with torch.no_grad():  # the allocation alone, on this rank's affinities of the next batch
            pre = trainer.sae.pre_activations(rows(next(batches)))
            before = comm.bytes_sent
            global_allocate(pre, trainer.sae.constraints(cfg.batch_size), comm, trainer.sae.scope.shard)
            result["allocation_bytes_per_step"] = comm.bytes_sent - before
        result["all_gather_bytes_avoided"] = pre.shape[0] * pre.shape[1] * pre.element_size()
    return result


def _spread(runs: list) -> dict:
    """The last run's bytes (the same every run) and the median, min and max tokens/s over the runs."""
    speeds = [run["tokens_per_second"] for run in runs]
    return {**runs[-1], "tokens_per_second": statistics.median(speeds), "tokens_per_second_runs": speeds}


def on_ranks(rank: int, world_size: int, args, out: str) -> None:
    results = {name: _timed_steps(_trainer(options, args), args) for name, options in RULES.items()}
    if rank == 0:
        torch.save(results, out)


START, END = "<!-- distributed:start -->", "<!-- distributed:end -->"


def _ratio(result: dict) -> str:
    sent = result["allocation_bytes_per_step"]
    return f"{result['all_gather_bytes_avoided'] / sent:.0f}x" if sent else "no traffic"


def _speed(result: dict) -> str:
    runs = result.get("tokens_per_second_runs", [result["tokens_per_second"]])
    return f"{result['tokens_per_second']:.0f} [{min(runs):.0f}-{max(runs):.0f}]"


def section(payload: dict) -> str:
    """The README's measured table, from a result file."""
    settings, load = payload["settings"], payload["machine"].get("load_average")
    lines = [
        f"Measured by `benchmarks/bench_distributed.py` (gloo, {payload['threads_per_process']} thread per process, "
        f"d_in {settings['d_in']}, F {settings['n_features']}, k {settings['k']}, global batch "
        f"{settings['batch_size']}; tokens/s: median over {settings.get('repeats', 1)} alternated runs of the median "
        f"of {settings['steps']} steps, [min-max] of the runs; load average {load}; "
        "`benchmarks/results/distributed_cpu.json`). Bytes are what rank 0 sends per step.",
        "",
        "| rule | 1 process tokens/s | 2 processes tokens/s | global allocation B/step | n_local x F all-gather B "
        "| all-gather / allocation | all our collectives B/step | DDP gradients B/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in payload["rules"].items():
        two = row["two_processes"]
        lines.append(
            f"| {name} | {_speed(row['one_process'])} | {_speed(two)} | "
            f"{two['allocation_bytes_per_step']:.0f} | {two['all_gather_bytes_avoided']:.0f} | {_ratio(two)} | "
            f"{two['bytes_per_step']:.0f} | {two['gradient_bytes_per_step']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--n-features", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="1- and 2-process runs, alternated")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 1 repeat (for the tests)")
    parser.add_argument("--name", default="distributed")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the README table from results/")
    parser.add_argument("--output", type=Path, help="result file (default benchmarks/results/<name>_cpu.json)")
    args = parser.parse_args(argv)
    if args.report_only:
        import json

        payload = json.loads((_common.RESULTS / f"{args.name}_cpu.json").read_text())
        return 0 if _common.write_marked_section(section(payload), START, END) else 1
    if args.quick:
        args.d_in, args.n_features, args.k, args.batch_size, args.steps, args.warmup = 16, 64, 4, 64, 2, 1
        args.repeats = 1
        args.name = args.name if args.name != "distributed" else "distributed_quick"
    torch.set_num_threads(1)
    singles, pairs = [], []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):  # alternated: the machine's load drifts
            singles.append({name: _timed_steps(_trainer(options, args), args) for name, options in RULES.items()})
            out = str(Path(folder) / f"ranks{repeat}.pt")
            codes = run_local_ranks(on_ranks, 2, args, out)
            if codes != [0, 0]:
                print(f"the 2-rank run failed: exit codes {codes}", file=sys.stderr)
                return 1
            pairs.append(torch.load(out, weights_only=False))
    rows = {}
    for name in RULES:
        one = _spread([run[name] for run in singles])
        two = _spread([run[name] for run in pairs])
        rows[name] = {
            "one_process": one,
            "two_processes": two,
            "speedup": two["tokens_per_second"] / one["tokens_per_second"],
            "allocation_bytes_vs_all_gather": two["allocation_bytes_per_step"] / two["all_gather_bytes_avoided"],
        }
    payload = {"benchmark": "distributed", "machine": _common.machine(torch.device("cpu")),
               "settings": {k: getattr(args, k) for k in ("d_in", "n_features", "k", "batch_size", "steps",
                                                          "warmup", "repeats")},
               "backend": "gloo", "threads_per_process": 1, "allocation_scope": "global", "rules": rows}
    if args.output is not None:
        import json

        args.output.write_text(json.dumps(payload, indent=2) + "\n")
        path = args.output
    else:
        path = _common.write_result(args.name, torch.device("cpu"), payload)
    for name, row in rows.items():
        two = row["two_processes"]
        print(f"{name:20s} 1 proc {row['one_process']['tokens_per_second']:8.0f} tok/s | 2 procs "
              f"{two['tokens_per_second']:8.0f} tok/s | allocation {two['allocation_bytes_per_step']:9.0f} B/step "
              f"vs all-gather {two['all_gather_bytes_avoided']:9.0f} B | all collectives "
              f"{two['bytes_per_step']:9.0f} B "
              f"| gradients {two['gradient_bytes_per_step']:9.0f} B")
    print(f"written to {path}")
    if not args.quick and args.output is None and _common.write_marked_section(section(payload), START, END):
        print("README.md: the distributed table is updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
