"""Peer benchmark: allocation's TopK / Feature Choice / Mutual Choice vs EleutherAI sparsify and SAELens.

    make bench-peers                                     # .venv-peers with the peers, run, README table
    .venv-peers/bin/python benchmarks/bench_peers.py --settings 16x1536,32x3072 --seeds 0,1,2
    .venv-peers/bin/python benchmarks/bench_peers.py --report-only   # README table from the JSON

Every system trains on the same MiniLM-L6 layer-3 activations, the same batches in the same order
(``ArraySource.batch(batch_size, seed, b)`` of the train split), the same budget (k per token, or k n
per batch), the same number of steps and the same recipe (Adam betas / eps, lr with linear warmup
over 5% of the steps and linear decay to 0 over the last 20%, gradient-norm clipping, b_dec at init
= the geometric median of one sample), with their steps interleaved in one process in rotating
order. Held-out = the last 10% of the tokens, split by a fixed seeded permutation into a calibration
half and an evaluation half; every figure is measured on the evaluation half:

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2,  L0 = mean kept features per token (inference),

dead = features kept on no evaluation token (and: on no training token of the last 25% of steps).
"As trained" is each system's own inference; "calibrated" sets a batch rule's inference thresholds
on the calibration half so that its L0 there is k. Step time = perf_counter around one full step
(forward, loss, backward, optimiser, decoder renormalisation, the trainer's bookkeeping); ratios
are per-step ratios, then medians over the steps.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _peers  # noqa: E402
from _peers import SYSTEMS, Setup, System  # noqa: E402

from allocation.sae import ArraySource, TrainConfig, geometric_median, load_activations  # noqa: E402

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- peers:start -->", "<!-- peers:end -->"
SPLIT_SEED = 0  # the held-out permutation into calibration / evaluation halves, the same for every seed
REFERENCES = ("sparsify-topk", "allocation-topk")  # step-time ratios are taken to these
DEAD_WINDOW = 0.25  # "dead in training": no activation in the last 25% of the steps
QUICK = {"settings": "4x64", "seeds": "0", "steps": 6, "batch_size": 32, "n_tokens": 1200, "d_in": 16}

SystemFactory = Callable[[Setup, Tensor, Tensor], System]


# ------------------------------------------------------------------------------------------ data


class Data:
    """The activations: a train split streamed in seeded batches, and the held-out halves."""

    def __init__(self, source: ArraySource) -> None:
        self.source = source
        self.train = as_tensor(source.split_rows("train"))
        self.calibration, self.evaluation = split_heldout(as_tensor(source.split_rows("heldout")))

    @property
    def d_in(self) -> int:
        return self.source.d_in

    def batch(self, batch_size: int, seed: int, index: int) -> Tensor:
        """Batch ``index`` of the seeded train stream (the batches allocation's Trainer.run would use)."""
        return self.source.batch(batch_size, seed=seed, batch_index=index, split="train")

    def b_dec(self, seed: int) -> Tensor:
        """The shared b_dec at init: geometric median of the sample allocation's Trainer would take."""
        return geometric_median(self.source.sample(TrainConfig().b_dec_sample, seed=seed))


def as_tensor(rows) -> Tensor:
    """A float32 copy of an array's rows (the source's arrays may be read-only memmaps)."""
    return torch.tensor(np.asarray(rows), dtype=torch.float32)


def split_heldout(heldout: Tensor, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(calibration, evaluation): the two halves of a seeded random permutation of the held-out rows."""
    order = torch.randperm(heldout.shape[0], generator=torch.Generator().manual_seed(seed))
    half = heldout.shape[0] // 2
    return heldout[order[:half]], heldout[order[half:]]


def minilm_data(n_tokens: int) -> Data:
    """MiniLM-L6 layer-3 activations of ``n_tokens`` tokens (cached; last 10% held out)."""
    return Data(load_activations("minilm", n_tokens=n_tokens))


def random_data(n_tokens: int, d_in: int, seed: int = 0) -> Data:
    """Correlated Gaussian activations (quick runs and tests): x = z A + c."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=generator) / math.sqrt(d_in)
    x = torch.randn(n_tokens, d_in, generator=generator) @ mixing + torch.randn(d_in, generator=generator)
    return Data(ArraySource(x, name="random"))


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(system: System, x: Tensor) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2, the L0 spread and the dead fraction on x."""
    x_hat, active = system.encode_eval(x)
    l0 = active.sum(dim=1).double()
    return {
        "fvu": float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()),
        "l0": float(l0.mean()),
        "l0_std": float(l0.std()) if l0.numel() > 1 else 0.0,
        "l0_p5": float(l0.quantile(0.05)),
        "l0_p95": float(l0.quantile(0.95)),
        "dead_fraction": float((~active.any(dim=0)).double().mean()),
    }


def rotated(items: Sequence, shift: int) -> list:
    """items[shift:] + items[:shift] (shift taken mod len): the order of one interleaved round."""
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """median over steps of t_step / t_reference_step (same step, same batch)."""
    return statistics.median(a / b for a, b in zip(times, reference, strict=True))


# ------------------------------------------------------------------------------------------ runs


def train_interleaved(systems: list[System], data: Data, setup: Setup,
                      on_step: Optional[Callable[[System, Tensor], None]] = None) -> dict[str, dict]:
    """Train every system on the same batches, steps interleaved in rotating order; per-step times."""
    seconds = {system.name: [] for system in systems}
    l0 = {system.name: [] for system in systems}
    for step in range(setup.steps):
        batch = data.batch(setup.batch_size, setup.seed, step)
        checksum = float(batch.double().sum())
        lr = setup.lr_at(step)
        for system in rotated(systems, step):
            start = time.perf_counter()
            system.step(batch, lr)
            seconds[system.name].append(time.perf_counter() - start)
            l0[system.name].append(system.last_l0())
            if on_step is not None:
                on_step(system, batch)
        if float(batch.double().sum()) != checksum:
            raise AssertionError(f"a system modified the shared batch {step} in place")
    return {name: {"seconds": seconds[name], "train_l0": l0[name]} for name in seconds}


def run_seed(factories: Sequence[SystemFactory], data: Data, setup: Setup, workdir: Path,
             on_step: Optional[Callable[[System, Tensor], None]] = None) -> dict:
    """Build every system for one seed, train them interleaved, evaluate as trained and calibrated."""
    b_dec = data.b_dec(setup.seed)
    systems = [factory(setup, b_dec, data.train) for factory in factories]
    training = train_interleaved(systems, data, setup, on_step)
    results = {}
    for system in systems:
        system.finish(workdir / f"k{setup.k}_F{setup.n_features}_seed{setup.seed}")
        results[system.name] = system_result(system, training, data, setup)
    add_ratios(results, training)
    return {"seed": setup.seed, "systems": results}


def system_result(system: System, training: dict, data: Data, setup: Setup) -> dict:
    """One system's figures for one seed (as trained, calibrated, training L0, dead, step time)."""
    times = training[system.name]["seconds"]
    window = max(1, math.ceil(DEAD_WINDOW * setup.steps))
    result = {
        "family": system.family,
        "rule": system.rule,
        "batch_rule": system.batch_rule,
        "optimizer": system.optimizer_settings(setup.lr_at(setup.steps - 1)),
        "config": json.loads(json.dumps(system.config(), default=str)),
        "as_trained": evaluate(system, data.evaluation),
        "as_trained_calibration_half": evaluate(system, data.calibration),
        "train_l0_last": training[system.name]["train_l0"][-1],
        "train_l0_mean": statistics.fmean(training[system.name]["train_l0"]),
        "dead_in_training_fraction": float((system.steps_since_fired() >= window).double().mean()),
        "dead_in_training_window_steps": window,
        "median_step_ms": statistics.median(times) * 1e3,
        "step_ms": [round(t * 1e3, 3) for t in times],
    }
    how = system.calibrate(data.calibration, setup.k) if system.batch_rule else None
    result["calibration"] = how
    result["calibrated"] = evaluate(system, data.evaluation) if how is not None else None
    result["calibrated_calibration_half"] = evaluate(system, data.calibration) if how is not None else None
    result["calibration_report"] = getattr(system, "calibration_report", None)
    return result


def add_ratios(results: dict, training: dict) -> None:
    """step_ratio_to_<reference>: median over steps of this system's step time / the reference's."""
    for reference in REFERENCES:
        if reference not in training:
            continue
        base = training[reference]["seconds"]
        for name, result in results.items():
            result[f"step_ratio_to_{reference}"] = median_ratio(training[name]["seconds"], base)


def summarize(runs: list[dict]) -> dict:
    """mean and std over seeds of every scalar figure, per system."""
    names = runs[0]["systems"].keys()
    return {name: summarize_system([run["systems"][name] for run in runs]) for name in names}


def summarize_system(per_seed: list[dict]) -> dict:
    keys = ["median_step_ms", "dead_in_training_fraction", "train_l0_last",
            *[f"step_ratio_to_{r}" for r in REFERENCES if f"step_ratio_to_{r}" in per_seed[0]]]
    summary = {key: mean_std([seed[key] for seed in per_seed]) for key in keys}
    for block in ("as_trained", "calibrated", "calibrated_calibration_half", "as_trained_calibration_half"):
        if all(seed[block] is not None for seed in per_seed):
            summary[block] = {key: mean_std([seed[block][key] for seed in per_seed])
                              for key in per_seed[0][block]}
        else:
            summary[block] = None
    summary["calibration"] = per_seed[0]["calibration"]
    return summary


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample std over seeds; 0 for one seed), "values"}."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def run_setting(factories: Sequence[SystemFactory], data: Data, k: int, n_features: int, seeds: Iterable[int],
                args: argparse.Namespace, workdir: Path) -> dict:
    runs = []
    for seed in seeds:
        setup = Setup(k=k, n_features=n_features, d_in=data.d_in, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, seed=seed)
        started = time.perf_counter()
        runs.append(run_seed(factories, data, setup, workdir))
        print(f"-- k={k} F={n_features} seed={seed}: {time.perf_counter() - started:.0f} s", flush=True)
        print_seed(runs[-1])
    return {"k": k, "n_features": n_features, "runs": runs, "summary": summarize(runs)}


def print_seed(run: dict) -> None:
    for name, result in run["systems"].items():
        calibrated = result["calibrated"]
        extra = f"  calibrated {calibrated['fvu']:.4f} @ {calibrated['l0']:.1f}" if calibrated else ""
        print(f"   {name:18s} fvu {result['as_trained']['fvu']:.4f} @ L0 {result['as_trained']['l0']:.1f}"
              f"{extra}  dead {result['as_trained']['dead_fraction']:.3f}  "
              f"step {result['median_step_ms']:.1f} ms", flush=True)


# --------------------------------------------------------------------------------------- systems


def selected_systems(names: Sequence[str]) -> list[SystemFactory]:
    """The requested systems whose packages are importable (refuses a missing peer by name)."""
    factories = []
    for name in names:
        cls = SYSTEMS[name]
        if not _peers.available(cls.family):
            raise SystemExit(f"{name} needs the {cls.family} package: run `make bench-peers` (it installs the "
                             "peers extra into .venv-peers)")
        factories.append(cls)
    return factories


def versions() -> dict:
    """Versions of torch, the peers and allocation (with its git commit)."""
    found = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for package in ("eai-sparsify", "sae-lens", "allocation"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    try:
        found["allocation_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                                                    text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found["allocation_commit"] = None
    return found


# ---------------------------------------------------------------------------------------- report


def fmt(stat: Optional[dict], digits: int = 3) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def cell_at_l0(block: Optional[dict], calibration_half: Optional[dict] = None) -> str:
    """'FVU mean ± std @ L0 mean' of one evaluation block (and the calibration half's L0), or '—'."""
    if block is None:
        return "—"
    cell = f"{fmt(block['fvu'], 4)} @ {block['l0']['mean']:.1f}"
    if calibration_half is not None:
        cell += f" (cal. {calibration_half['l0']['mean']:.1f})"
    return cell


def render(payload: dict, earlier: Optional[dict] = None) -> str:
    """The README's peers section (markdown) from the benchmark's JSON; every figure read from it.

    ``earlier``: a complete earlier run whose settings missing from ``payload`` are shown after its
    tables, each labelled with that run's allocation commit and command.
    """
    lines = [
        f"Generated by `make bench-peers` (`benchmarks/bench_peers.py`) from `benchmarks/results/"
        f"{payload['file']}`. Command: `{payload.get('resolved_command', payload['command'])}`"
        f"{'' if payload.get('complete', True) else ' (incomplete)'}; {payload['wall_seconds']:.0f} s.",
        "",
        *describe_protocol(payload),
        "",
    ]
    if not payload.get("complete", True):
        lines += [f"**Incomplete run**: {len(payload['settings'])} setting(s) written so far.", ""]
    for setting in payload["settings"]:
        lines += setting_table(setting, len(setting["runs"]))
    lines += earlier_tables(payload, earlier)
    lines += [f"_{payload['caveat']}_", ""]
    return "\n".join(lines)


def earlier_tables(payload: dict, earlier: Optional[dict]) -> list[str]:
    """Tables of the settings that ``earlier`` has and ``payload`` lacks, labelled as from that run."""
    if earlier is None:
        return []
    done = {(s["k"], s["n_features"]) for s in payload["settings"]}
    missing = [s for s in earlier["settings"] if (s["k"], s["n_features"]) not in done]
    if not missing:
        return []
    command = earlier.get("resolved_command", earlier["command"])
    lines = [f"From an earlier complete run (`benchmarks/results/{earlier['file']}`, allocation "
             f"{earlier['versions']['allocation_commit'][:10]}, `{command}`, "
             f"{earlier['wall_seconds']:.0f} s), for the settings the run above did not reach:", ""]
    for setting in missing:
        lines += setting_table(setting, len(setting["runs"]))
    return lines


def describe_protocol(payload: dict) -> list[str]:
    p, v, m = payload["protocol"], payload["versions"], payload["machine"]
    overridden = "; ".join(f"**{family}**: " + ", ".join(items) for family, items in payload["overridden"].items())
    return [
        f"Identical for every system: the activations ({p['data']}, {p['n_tokens']} tokens, d_in = "
        f"{p['d_in']}; held-out = the last {p['heldout_fraction']:.0%}, split by a fixed seeded permutation into "
        f"a calibration half of {p['n_calibration']} and an evaluation half of {p['n_evaluation']} tokens), the "
        f"batches and their order ({p['batch_size']} tokens, {p['steps']} steps), the budget (k per token; k n per "
        f"batch for the batch rules), Adam (betas {p['adam_betas'][0]} / {p['adam_betas'][1]}, eps "
        f"{p['adam_eps']:g}), lr {p['lr']:g} with linear warmup over {p['warmup_steps']} steps and linear decay to "
        f"0 over the last {p['decay_steps']}, gradient-norm clipping at {p['grad_clip']:g}, b_dec at init = the "
        f"geometric median of {p['b_dec_sample']} training tokens, no auxiliary loss; steps interleaved in one "
        f"process in rotating order, {m['threads']} torch thread(s). Versions: torch {v['torch']}, sparsify "
        f"(eai-sparsify) {v['eai-sparsify']}, SAELens {v['sae-lens']}, allocation {v['allocation_commit'][:10]}. "
        f"Each peer is stepped as its own trainer steps it (sparsify: unit-norm decoder before each forward, FVU "
        f"loss, parallel-gradient removal; SAELens: `SAETrainer.step`, its class defaults such as "
        f"`rescale_acts_by_decoder_norm=True` and `decoder_init_norm=0.1`, inference via `save_inference_model` "
        f"then `SAE.load_from_disk`). Defaults overridden: {overridden}. {optimizer_note(payload)} "
        f"{allocation_defaults_note(payload)}",
        "",
        "FVU and L0 on the evaluation half, mean ± std over seeds. **As trained** = each system's own "
        "inference: TopK keeps k per token; allocation's batch rules use the thresholds learned in "
        "training; SAELens BatchTopK is its JumpReLU inference SAE, whose threshold is an EMA of the "
        f"smallest kept activation of each batch. **Calibrated to L0 = k**: {payload['calibration_note']} "
        "L0 after @ is the measured mean L0 of that row on the evaluation half (cal. = on the calibration "
        "half, where calibration sets it); TopK rules have no thresholds (—). Dead = features that fire "
        "on no evaluation token; dead in training = no "
        f"activation in the last {payload['protocol']['dead_window_fraction']:.0%} of the steps. Step = median "
        "step time; ratios = median over steps of the per-step ratio (same step, same batch).",
        "",
    ]


def optimizer_note(payload: dict) -> str:
    """Which systems' Adam differs from the shared recipe (fused kernel, a group at another lr), from the JSON."""
    if not payload["settings"]:
        return ""
    notes: dict[str, list[str]] = {}
    for name, result in payload["settings"][0]["runs"][0]["systems"].items():
        adam = result["optimizer"]
        parts = ["fused Adam"] if adam.get("fused") else []
        parts += [f"{', '.join(g['parameters'])} at {g['lr_scale']:g}x the lr"
                  for g in adam["groups"] if g["lr_scale"] is not None and abs(g["lr_scale"] - 1) > 1e-9]
        if parts:
            notes.setdefault(", ".join(parts), []).append(name)
    if not notes:
        return "Every system trains with the same Adam at the shared lr."
    found = "; ".join(f"{', '.join(names)}: {what}" for what, names in notes.items())
    return (f"Optimiser as read back from each system after its last step (its own defaults, kept): {found} "
            f"(first setting, seed {payload['settings'][0]['runs'][0]['seed']}); the others: plain Adam at the "
            "shared lr.")


ALLOCATION_KEYS = ("decoder_lr_scale", "encoder_init_scale", "threshold_decay", "threshold_correction", "decode",
                   "reduction")


def allocation_defaults_note(payload: dict) -> str:
    """allocation's own TrainConfig values in this run (its defaults, not set by the benchmark), from the JSON."""
    if not payload["settings"]:
        return ""
    systems = payload["settings"][0]["runs"][0]["systems"]
    config = next((r["config"] for r in systems.values() if r["family"] == "allocation"), None)
    if not config:
        return ""
    values = ", ".join(f"{key} = {config[key]:.4g}" if isinstance(config[key], float) else f"{key} = {config[key]}"
                       for key in ALLOCATION_KEYS if key in config)
    return f"allocation's own defaults in this run: {values}."


def setting_table(setting: dict, n_seeds: int) -> list[str]:
    lines = [
        f"**k = {setting['k']}, F = {setting['n_features']}** ({n_seeds} seeds; load average after: "
        f"{setting.get('load_average_after', ['?'])[0]})",
        "",
        "| system | FVU as trained @ L0 | FVU calibrated @ L0 | dead (eval) | dead in training | step (ms) "
        "| / sparsify TopK | / allocation TopK |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in setting["summary"].items():
        ratios = [fmt(s.get(f"step_ratio_to_{r}"), 2) for r in REFERENCES]
        dead = s["as_trained"]["dead_fraction"]
        lines.append(
            f"| {name} | {cell_at_l0(s['as_trained'])} "
            f"| {cell_at_l0(s['calibrated'], s.get('calibrated_calibration_half'))} | {fmt(dead)} "
            f"| {fmt(s['dead_in_training_fraction'])} | {fmt(s['median_step_ms'], 1)} | {ratios[0]} | {ratios[1]} |"
        )
    return lines + [""]


def write_readme(section: str, readme: Path = README) -> bool:
    """Put ``section`` between the peers markers (inserting them before '## Development' if absent)."""
    text = readme.read_text()
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "\n## Development" in text:
        head, rest = text.split("\n## Development", 1)
        text = head + f"\n## Peers: sparsify and SAELens\n\n{block}\n\n## Development" + rest
    else:
        return False
    readme.write_text(text)
    return True


LR_START, LR_END = "<!-- peers-lr:start -->", "<!-- peers-lr:end -->"
LR_FILES = ("peers_cpu.json", "peers_lr4e-3_cpu.json", "peers_lr6e-3_cpu.json")


def render_lr_sensitivity(paths: Sequence[Path], k: int = 16, n_features: int = 1536) -> str:
    """Held-out FVU (as trained; calibrated for batch rules) of every system at each common lr, from the JSONs."""
    runs = []
    for path in paths:
        payload = json.loads(path.read_text())
        for setting in payload["settings"]:
            if (setting["k"], setting["n_features"]) == (k, n_features):
                runs.append((payload["protocol"]["lr"], path.name, setting["summary"]))
    runs.sort()
    systems = list(runs[0][2]) if runs else []
    lines = [
        f"Generated by `benchmarks/bench_peers.py --report-only` from {', '.join(f'`{name}`' for _, name, _ in runs)}: "
        f"k = {k}, F = {n_features}, the protocol above with one common lr for every system (3 seeds). FVU as "
        "trained @ its held-out L0; batch rules also calibrated to L0 = k (in brackets).",
        "",
        "| system | " + " | ".join(f"lr {lr:g}" for lr, _, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for system in systems:
        cells = []
        for _, _, summary in runs:
            row = summary[system]
            cell = f"{fmt(row['as_trained']['fvu'], 4)} @ {row['as_trained']['l0']['mean']:.1f}"
            calibrated = row.get("calibrated")
            if calibrated:
                cell += f" ({fmt(calibrated['fvu'], 4)} @ {calibrated['l0']['mean']:.1f})"
            cells.append(cell)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- CLI


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'16x1536,32x3072' -> [(16, 1536), (32, 3072)] as (k, n_features)."""
    settings = []
    for item in text.split(","):
        k, _, features = item.strip().partition("x")
        if not (k.isdigit() and features.isdigit()):
            raise SystemExit(f"--settings takes KxF items such as 16x1536, got {item!r}")
        settings.append((int(k), int(features)))
    return settings


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="16x1536,8x768,32x3072", help="KxF items (k, n_features)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-tokens", type=int, default=50_000, help="MiniLM tokens (last 10%% held out)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--name", default="peers", help="results file benchmarks/results/<name>_cpu.json")
    parser.add_argument("--output", type=Path, help="results file (overrides --name)")
    parser.add_argument("--readme", type=Path, help="README to update (default: README.md, not with --quick)")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the README section")
    parser.add_argument("--quick", action="store_true", help="tiny random data, a few steps (for the test)")
    parser.add_argument("--earlier", type=Path, help="a complete earlier results file: its settings missing "
                        "from this run are rendered after this run's tables, labelled")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key != "d_in":
                setattr(args, key, value)
    return args


def output_path(args: argparse.Namespace) -> Path:
    return args.output or _common.RESULTS / f"{args.name}_cpu.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    path = output_path(args)
    if not args.report_only:
        run(args, path, command=" ".join(["benchmarks/bench_peers.py", *argv]))
    payload = json.loads(path.read_text())
    earlier = json.loads(args.earlier.read_text()) if args.earlier else None
    if earlier is not None:
        earlier["file"] = args.earlier.name
    section = render(payload, earlier)
    readme = args.readme or (None if args.quick or args.no_readme else README)
    if readme is not None and not write_readme(section, readme):
        print(f"{readme} has neither the peers markers nor a '## Development' heading; section not written")
    lr_paths = [_common.RESULTS / name for name in LR_FILES if (_common.RESULTS / name).exists()]
    if readme is not None and lr_paths:
        _common.write_marked_section(render_lr_sensitivity(lr_paths), LR_START, LR_END, readme)
    print(section)
    return 0


def run(args: argparse.Namespace, path: Path, command: str) -> None:
    torch.set_num_threads(args.threads)
    factories = selected_systems([name.strip() for name in args.systems.split(",")])
    data = random_data(args.n_tokens, QUICK["d_in"]) if args.quick else minilm_data(args.n_tokens)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    device = torch.device("cpu")
    load_before = _common.machine(device)["load_average"]
    started = time.perf_counter()
    payload = {
        "benchmark": "peers",
        "file": path.name,
        "command": command,
        "resolved_command": resolved_command(args),
        "machine": _common.machine(device),
        "load_average_before": load_before,
        "versions": versions(),
        "protocol": protocol(args, data, seeds),
        "overridden": _peers.OVERRIDDEN,
        "calibration_api": _peers.calibration_api() is not None,
        "calibration_note": calibration_note(_peers.calibration_api() is not None),
        "settings": [],
        "complete": False,
        "caveat": _common.LOAD_CAVEAT,
    }
    with _peers.temporary_workdir() as workdir:
        for k, features in parse_settings(args.settings):  # the file is rewritten after each setting
            payload["settings"].append(run_setting(factories, data, k, features, seeds, args, Path(workdir)))
            payload["settings"][-1]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            payload["wall_seconds"] = time.perf_counter() - started
            write_payload(path, payload)
    payload["complete"] = True
    write_payload(path, payload)
    print(f"wrote {path} ({payload['wall_seconds']:.0f} s)")


def resolved_command(args: argparse.Namespace) -> str:
    """The command with every protocol option spelled out (what the defaults were in this run)."""
    return (f"benchmarks/bench_peers.py --settings {args.settings} --seeds {args.seeds} --steps {args.steps} "
            f"--batch-size {args.batch_size} --lr {args.lr:g} --n-tokens {args.n_tokens} --threads {args.threads}"
            + (" --quick" if args.quick else ""))


def write_payload(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def calibration_note(api: bool) -> str:
    saelens = ("SAELens BatchTopK: one global JumpReLU threshold halfway between the (k n)-th and (k n + 1)-th "
               "largest pre-activation of the n calibration tokens (exactly k n kept there).")
    if not api:
        return ("allocation's batch rules: not calibrated in this run (allocation.sae.calibrate_thresholds "
                "was not available in this checkout). " + saelens)
    return ("allocation's batch rules: `allocation.sae.calibrate_thresholds(sae, x_calibration, target_l0=k)` "
            "on the calibration half. " + saelens)


def protocol(args: argparse.Namespace, data: Data, seeds: list[int]) -> dict:
    setup = Setup(k=1, n_features=1, d_in=data.d_in, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    return {
        "data": "random (quick)" if args.quick else "MiniLM-L6 layer 3",
        "n_tokens": data.source.n_tokens,
        "d_in": data.d_in,
        "heldout_fraction": data.source.heldout_fraction,
        "n_calibration": data.calibration.shape[0],
        "n_evaluation": data.evaluation.shape[0],
        "split_seed": SPLIT_SEED,
        "seeds": seeds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        **{key: value for key, value in asdict(setup).items() if key in ("lr", "warmup_fraction",
                                                                          "decay_fraction", "grad_clip")},
        "warmup_steps": setup.warmup_steps,
        "decay_steps": setup.decay_steps,
        "adam_betas": list(_peers.ADAM_BETAS),
        "adam_eps": _peers.ADAM_EPS,
        "b_dec_sample": TrainConfig().b_dec_sample,
        "dead_window_fraction": DEAD_WINDOW,
        "threads": args.threads,
        "systems": args.systems.split(","),
    }


if __name__ == "__main__":
    raise SystemExit(main())
