"""The study of the paper's claims: are Feature / Mutual Choice SAEs better than TopK, aux_zipf than aux_k?

    make study                                   # every part, then the figures and the README section
    make study ARGS=--quick                      # tiny data, seconds (tests/test_study.py runs it)
    .venv/bin/python benchmarks/study.py --parts grid --setting /work/handoff_13.json
    .venv/bin/python benchmarks/study.py --report-only   # figures + README "Does it work?" from the JSONs

Parts, each in its own results file ``<out-dir>/study_<part>_cpu.json``, rewritten after every run (an
interrupted study keeps what it measured; a rerun of the same setting skips the runs already there):

  grid       rules {TopK, Feature Choice, Feature Choice with Zipf capacities s = 1, Mutual Choice}
             x aux {none, aux_k_loss, aux_zipf_loss} x seeds, at the dead-feature setting
  ksweep     k in {8, 16, 32, 64} per rule, aux_k_loss (TrainConfig's default aux), a smaller width
  synthetic  synthetic ground truth (allocation.sae.synthetic): feature recovery per rule and aux
  confirm    every rule with aux_k_loss and without aux at issue 13 part 1's (larger) dead-feature setting
  peers      sparsify TopK, SAELens TopK / BatchTopK on the peer protocol (bench_peers.run_seed) at the
             grid's k, F and steps, where the peer extra is importable; otherwise recorded as skipped

Protocol of the MiniLM parts: every rule and aux of a seed trains on the same batches of the train split
(``source.batches(batch_size, seed)``) from the same initialisation (TrainConfig.seed), with TrainConfig's
recipe (Adam, warmup, decay, clipping, decoder lr scale). The held-out 10% is split by a fixed seeded
permutation into a calibration and an evaluation half (``bench_peers.split_heldout``, the peer
benchmark's split); figures are measured on the evaluation half (bench_peers.evaluate):

  as trained   eval mode: TopK keeps k per token, the batch rules their learnt thresholds
  calibrated   the batch rules' thresholds calibrated to L0 = k on the calibration half
               (allocation.sae.calibrated_copy); TopK's L0 is k already (its row is its as-trained one)
  FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2; L0 = kept features per token (mean, std, p5, p95)
  dead = features firing on no evaluation token; under-used = firing on fewer than a tenth of the
  uniform share k / F of the tokens (allocation.sae.metrics.under_used_fraction)
  in training: dead = no activation in the last dead_tokens tokens; under-used over the last 25% of steps

Synthetic: the same, with the calibration and evaluation tokens drawn from the source's held-out stream,
and feature recovery = mean over true features of the best cosine with a decoder row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import bench_peers  # noqa: E402
import study_report  # noqa: E402

from allocation.sae import TrainConfig, Trainer, calibrated_copy, feature_recovery, load_activations  # noqa: E402
from allocation.sae.atomic import write_file  # noqa: E402
from allocation.sae.metrics import under_used_fraction  # noqa: E402
from allocation.sae.train import FIELDS_BEFORE_0_2  # noqa: E402

RULES = {  # label -> TrainConfig fields of the rule
    "topk": {"rule": "topk"},
    "feature-choice": {"rule": "feature-choice"},
    "feature-choice-zipf": {"rule": "feature-choice", "zipf_capacities": 1.0},
    "feature-choice-zipf-floor": {"rule": "feature-choice", "zipf_capacities": 1.0, "min_capacity": 1},
    "mutual-choice": {"rule": "mutual-choice"},
}
AUX = ("none", "k", "zipf")
PARTS = ("grid", "ksweep", "synthetic", "confirm", "peers")
PEER_SYSTEMS = ("sparsify-topk", "saelens-topk", "saelens-batchtopk", "allocation-topk", "allocation-mc")
CONFIRM_AUX = ("k", "none")  # the confirm part: no aux_zipf (issue 13 part 1 compares its variants there)
TRAIN_WINDOW = 0.25  # training under-used fraction: over the last 25% of the steps


@dataclass(frozen=True)
class Setting:
    """What every run of one part shares (recorded in its results file)."""

    data: str = "minilm"
    data_options: dict = field(default_factory=dict)
    k: int = 16
    n_features: int = 1536
    steps: int = 240
    batch_size: int = 512
    lr: Optional[float] = 2e-3
    dead_tokens: int = 10_000_000
    eval_tokens: int = 4096  # at most this many tokens of each held-out half
    ks: tuple = ()  # ksweep only
    train_options: dict = field(default_factory=dict)  # other TrainConfig fields for every run

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size


DEFAULTS = {
    # the dead-feature setting: TopK + aux_k_loss still leaves features dead (see SETTING_NOTES)
    "grid": Setting(data_options={"n_tokens": 242_447}, k=8, n_features=2048, steps=200, dead_tokens=25_600),
    # smaller than the grid (F = 1024, 82k tokens) to fit 48 runs in about 12 min on one shared core
    "ksweep": Setting(data_options={"n_tokens": 50_000}, n_features=1024, steps=160, ks=(8, 16, 32, 64),
                      dead_tokens=20_480),
    "synthetic": Setting(data="synthetic", data_options={"d_in": 64, "n_true_features": 256, "mean_active": 8.0},
                         k=8, n_features=512, steps=240, dead_tokens=30_720),
}
# issue 13 part 1's dead-feature setting itself, every rule with aux_k_loss (too costly here for the whole grid)
DEFAULTS["confirm"] = Setting(data_options={"n_tokens": 242_447}, k=16, n_features=4096, steps=250, batch_size=1024,
                              dead_tokens=25_600)
DEFAULTS["peers"] = DEFAULTS["grid"]
SETTING_NOTES = {  # how each default setting was chosen (rendered in the README)
    "grid": "a scaled-down variant of the dead-feature setting found for issue 13 part 1 (MiniLM, all 242,447 "
            "corpus tokens, F = 4096, k = 16, 256k tokens in batches of 1024, lr 2e-3, dead window 25,600 tokens: "
            "TopK + aux_k ended with 3.3% dead there, but one run took 256 s under this session's load, 2.5 h for "
            "36 runs). Same data, lr and dead window, F / k = 256 kept, half the width and 40% of the tokens "
            "(batch 512, so the dead window is a quarter of the run); the TopK + aux_k row below shows that "
            "features still die here",
    "ksweep": "sized so that its 48 runs take about 12 min on one shared core",
    "synthetic": "sized so that its 36 runs take about 5 min on one shared core",
}
SETTING_NOTES["confirm"] = "issue 13 part 1's dead-feature setting, no aux_zipf (256 s a run here: no full grid)"
SETTING_NOTES["peers"] = SETTING_NOTES["grid"]
QUICK = {
    "grid": Setting(data="random", data_options={"n_tokens": 1200, "d_in": 16}, k=4, n_features=64, steps=6,
                    batch_size=32, dead_tokens=64, eval_tokens=256),
    "ksweep": Setting(data="random", data_options={"n_tokens": 1200, "d_in": 16}, n_features=64, steps=6,
                      batch_size=32, ks=(2, 4), dead_tokens=64, eval_tokens=256),
    "synthetic": Setting(data="synthetic", data_options={"d_in": 16, "n_true_features": 48, "mean_active": 3.0},
                         k=4, n_features=64, steps=6, batch_size=32, dead_tokens=64, eval_tokens=256),
}
QUICK["confirm"] = QUICK["peers"] = QUICK["grid"]


# ------------------------------------------------------------------------------------------ data


class Heldout:
    """The source and its calibration / evaluation tokens (at most eval_tokens each)."""

    def __init__(self, source, calibration: Tensor, evaluation: Tensor) -> None:
        self.source, self.calibration, self.evaluation = source, calibration, evaluation


def load_data(setting: Setting, seed: int) -> Heldout:
    """MiniLM (or random, quick) activations with the peer benchmark's held-out halves; synthetic: its held-out
    stream (features seeded by the run's seed)."""
    n = setting.eval_tokens
    if setting.data == "synthetic":
        source = load_activations("synthetic", seed=seed, **setting.data_options)
        return Heldout(source, source.batch(n, seed=seed, batch_index=0, split="heldout"),
                       source.batch(n, seed=seed, batch_index=1, split="heldout"))
    if setting.data == "random":
        options = setting.data_options
        source = bench_peers.random_data(options["n_tokens"], options["d_in"]).source
    else:
        source = load_activations(setting.data, **setting.data_options)
    calibration, evaluation = bench_peers.split_heldout(bench_peers.as_tensor(source.split_rows("heldout")))
    return Heldout(source, calibration[:n], evaluation[:n])


_DATA_CACHE: dict = {}


def cached_data(setting: Setting, seed: int) -> Heldout:
    """load_data, kept for the process (one MiniLM source for every run; synthetic: one per seed)."""
    key = (setting.data, json.dumps(setting.data_options, sort_keys=True), setting.eval_tokens,
           seed if setting.data == "synthetic" else None)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(setting, seed)
    return _DATA_CACHE[key]


# ------------------------------------------------------------------------------------------ runs


class _EvalSystem:
    """An SAE as bench_peers.evaluate sees a system: eval-mode (x_hat, kept mask), in chunks of tokens."""

    def __init__(self, sae, chunk: int = 2048) -> None:
        self.sae, self.chunk = sae, chunk

    @torch.no_grad()
    def encode_eval(self, x: Tensor) -> tuple[Tensor, Tensor]:
        training = self.sae.training
        self.sae.eval()
        try:
            outs = [self.sae(part) for part in x.split(self.chunk)]
        finally:
            self.sae.train(training)
        return torch.cat([o.x_hat for o in outs]), torch.cat([o.mask for o in outs])


def heldout_metrics(sae, x: Tensor, budget_per_token: float) -> dict:
    """bench_peers.evaluate (FVU, L0 spread, dead) plus the under-used fraction, on the tokens x."""
    system = _EvalSystem(sae)
    metrics = bench_peers.evaluate(system, x)
    _, mask = system.encode_eval(x)
    frequency = mask.sum(dim=0).double() / x.shape[0]
    metrics["under_used_fraction"] = under_used_fraction(frequency, budget_per_token)
    return metrics


def train_config(setting: Setting, rule: str, aux: str, k: int, seed: int, aux_zipf_options: dict) -> TrainConfig:
    options = {**setting.train_options, **(aux_zipf_options if aux == "zipf" else {})}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SystemExit(f"TrainConfig has no field(s) {unknown} (--aux-zipf-options / train_options); "
                         "valid fields: " + ", ".join(sorted(known)))
    return TrainConfig(**RULES[rule], k=k, n_features=setting.n_features, aux=aux, tokens=setting.tokens,
                       batch_size=setting.batch_size, lr=setting.lr, dead_tokens=setting.dead_tokens, seed=seed,
                       downstream=False, **options)


def train_run(setting: Setting, rule: str, aux: str, k: int, seed: int, aux_zipf_options: dict) -> dict:
    """Train one SAE; its training statistics and held-out figures, as trained and calibrated to L0 = k."""
    started = time.perf_counter()
    data = cached_data(setting, seed)
    config = train_config(setting, rule, aux, k, seed, aux_zipf_options)
    trainer = Trainer(config, data.source)
    batches = data.source.batches(setting.batch_size, seed=seed)
    window_start = setting.steps - max(1, math.ceil(TRAIN_WINDOW * setting.steps))
    for step in range(setting.steps):
        if step == window_start:
            trainer.window.reset()
        trainer.train_step(next(batches))
    train_seconds = time.perf_counter() - started
    sae = trainer.sae
    window = trainer.window.summary(trainer.usage, sae.budget(setting.batch_size) / setting.batch_size)
    record = {
        "rule": rule, "rule_name": config.rule, "rule_options": config.rule_options_given(), "aux": aux,
        "aux_options": aux_zipf_options if aux == "zipf" else {},
        "aux_config": aux_zipf_config(config) if aux == "zipf" else {}, "k": k, "seed": seed,
        "training": {key: window[key] for key in ("fvu", "l0", "dead_fraction", "under_used_fraction")},
        "as_trained": heldout_metrics(sae, data.evaluation, k),
        "calibrated": None,
        # features the rule's own training caps never let fire (FC Zipf: capacities rounded to 0)
        "zero_capacity_fraction": zero_capacity_fraction(sae, setting.batch_size),
    }
    if sae.batch_dependent:
        twin, report = calibrated_copy(sae, data.calibration, float(k))
        record["calibrated"] = {**heldout_metrics(twin, data.evaluation, k),
                                "calibration_l0": report["calibration_l0"]}
    true_features = getattr(data.source, "true_features", None)
    if true_features is not None:
        record["feature_recovery"] = feature_recovery(sae.W_dec.detach(), true_features)
    record["train_seconds"] = train_seconds
    record["seconds"] = time.perf_counter() - started
    return record


def zero_capacity_fraction(sae, batch_size: int) -> float:
    """Fraction of features whose per-feature cap in a training batch is 0 (0.0 without such caps)."""
    capacity = sae.constraints(batch_size).resolve(batch_size, sae.n_features).per_feature
    return 0.0 if capacity is None else float((capacity == 0).mean())


def aux_zipf_config(config: TrainConfig) -> dict:
    """The TrainConfig fields that shape aux_zipf_loss (zipf_* but the rule's zipf_capacities), as in effect;
    a field at the value configs trained with before it existed (FIELDS_BEFORE_0_2) is left out, so adding an
    option that keeps the old formula by default does not change the runs' keys."""
    return {f.name: getattr(config, f.name) for f in fields(TrainConfig)
            if f.name.startswith("zipf_") and f.name != "zipf_capacities"
            and (f.name not in FIELDS_BEFORE_0_2 or FIELDS_BEFORE_0_2[f.name] != getattr(config, f.name))}


def run_key(rule: str, aux: str, k: int, seed: int, aux_config: dict) -> str:
    """A run's identity in its results file; aux_zipf runs include the aux_zipf fields in effect, so a change of
    TrainConfig's aux_zipf defaults (or of --aux-zipf-options) reruns exactly those runs."""
    options = json.dumps(aux_config, sort_keys=True) if aux == "zipf" else ""
    return f"{rule}|aux={aux}{options}|k={k}|seed={seed}"


def planned_runs(part: str, setting: Setting, seeds: Sequence[int], rules: Sequence[str],
                 auxes: Sequence[str]) -> list[tuple]:
    """(rule, aux, k, seed) of every run: aux-major (grid), seed-major (sweep); the rules of a seed together."""
    if part == "ksweep":
        return [(rule, "k", k, seed) for seed in seeds for k in setting.ks for rule in rules]
    if part == "confirm":
        return [(rule, aux, setting.k, seed) for aux in auxes if aux in CONFIRM_AUX for seed in seeds for rule in rules]
    return [(rule, aux, setting.k, seed) for aux in auxes for seed in seeds for rule in rules]


def setting_id(setting: Setting) -> str:
    """A short hash of the setting (a results file's runs are reused only for the same one)."""
    return hashlib.sha256(json.dumps(asdict(setting), sort_keys=True, default=list).encode()).hexdigest()[:12]


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, (json.dumps(payload, indent=1) + "\n").encode())


def load_previous(path: Path, setting: Setting) -> list[dict]:
    """The runs of an earlier results file of the same setting (none if absent or another setting)."""
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    return payload.get("runs", []) if payload.get("setting_id") == setting_id(setting) else []


def previous_commands(path: Path, setting: Setting, command: str) -> list[str]:
    """The commands that wrote ``path``'s runs of this setting so far, then ``command`` (once)."""
    commands: list = []
    if path.exists() and load_previous(path, setting):
        earlier = json.loads(path.read_text())
        commands = list(earlier.get("commands") or [earlier.get("command")])
    return commands + ([command] if command not in commands else [])


def run_part(part: str, setting: Setting, seeds: Sequence[int], path: Path, args: argparse.Namespace,
             log: Callable[[str], None] = print) -> dict:
    """Every planned run of a part not already in ``path`` (same setting), the file rewritten after each.

    Several processes may run parts of the same file (e.g. ``--aux none,k`` and ``--aux zipf``): each write
    merges the file's runs with this process's under a lock, by key.
    """
    aux_zipf_options = args.aux_zipf_options
    current = aux_zipf_config(train_config(setting, args.rules[0], "zipf", setting.k, 0, aux_zipf_options))
    payload = {
        "benchmark": "study", "part": part, "file": path.name, "command": args.command,
        "machine": _common.machine(torch.device("cpu")), "setting": asdict(setting), "setting_id": setting_id(setting),
        "seeds": list(seeds), "rules": {name: RULES[name] for name in RULES}, "aux": list(AUX),
        "aux_zipf_options": aux_zipf_options, "aux_zipf_config": current, "protocol": PROTOCOL, "quick": args.quick,
        "setting_source": args.setting_source.get(part) or SETTING_NOTES[part], "caveat": _common.LOAD_CAVEAT,
    }
    full_plan = {run_key(rule, aux, k, seed, current)
                 for rule, aux, k, seed in planned_runs(part, setting, seeds, list(RULES), list(AUX))}
    redo = [item.split("=", 1) for item in args.redo]
    mine: dict = {}

    def save(drop_redo: bool = False) -> dict:
        with locked(path):
            runs = load_previous(path, setting)
            payload["commands"] = previous_commands(path, setting, args.command)
            if drop_redo:
                runs = [r for r in runs if not any(str(r.get(key)) == value for key, value in redo)]
            runs = [r for r in runs if r["key"] not in mine] + list(mine.values())
            payload.update(runs=runs, complete=full_plan <= {r["key"] for r in runs},
                           total_run_seconds=sum(r["seconds"] for r in runs),
                           wall_seconds=time.perf_counter() - started)
            write_json(path, payload)
        return payload

    started = time.perf_counter()
    done = {r["key"] for r in save(drop_redo=True)["runs"]}
    for rule, aux, k, seed in planned_runs(part, setting, seeds, args.rules, args.aux):
        key = run_key(rule, aux, k, seed, current)
        if key in done:
            continue
        mine[key] = {"key": key, **train_run(setting, rule, aux, k, seed, aux_zipf_options),
                     "load_average": [round(x, 2) for x in os.getloadavg()]}
        save()
        log(describe_run(part, mine[key]))
    return save()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (fcntl) while a results file is read, merged and rewritten."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe_run(part: str, r: dict) -> str:
    at, cal = r["as_trained"], r["calibrated"] or r["as_trained"]
    extra = f" recovery {r['feature_recovery']:.3f}" if "feature_recovery" in r else ""
    return (f"[{part}] {r['key']}: FVU {at['fvu']:.4f} @ {at['l0']:.2f} | calibrated {cal['fvu']:.4f} @ "
            f"{cal['l0']:.2f} | dead train {r['training']['dead_fraction']:.3f} eval {cal['dead_fraction']:.3f} "
            f"| under-used train {r['training']['under_used_fraction']:.3f}{extra} | {r['seconds']:.1f} s")


PROTOCOL = {
    "split": "held-out 10% split by bench_peers.split_heldout (seed 0) into calibration / evaluation halves, "
             "each cut to eval_tokens (synthetic: held-out stream batches 0 and 1)",
    "as_trained": "eval mode (TopK: k per token; batch rules: learnt thresholds)",
    "calibrated": "allocation.sae.calibrated_copy(sae, calibration, k); TopK: none (L0 = k)",
    "dead_eval": "fraction of features firing on no evaluation token",
    "under_used": "fraction of features firing on fewer than 0.1 k / F of the tokens",
    "dead_training": "no activation in the last setting.dead_tokens training tokens",
    "under_used_training": f"over the last {TRAIN_WINDOW:.0%} of the training steps",
}


# ------------------------------------------------------------------------------------------ peers


def run_peers(setting: Setting, seeds: Sequence[int], path: Path, args: argparse.Namespace) -> dict:
    """The peers' TopK / BatchTopK as reference rows (bench_peers' protocol), or a record of why not."""
    missing = sorted({_peers_family(name) for name in args.peer_systems if not _peers_available(name)})
    payload = {"benchmark": "study", "part": "peers", "file": path.name, "command": args.command,
               "setting": asdict(setting), "setting_id": setting_id(setting), "seeds": list(seeds)}
    if missing:
        payload.update(skipped=f"the peer extra is not importable here ({', '.join(missing)} missing): run "
                       "`make bench-peers` once, then `.venv-peers/bin/python benchmarks/study.py --parts peers`",
                       complete=True)
        write_json(path, payload)
        return payload
    import _peers

    data = bench_peers.Data(cached_data(setting, seeds[0]).source)
    factories = [_peers.SYSTEMS[name] for name in args.peer_systems]
    runs, started = [], time.perf_counter()
    with _peers.temporary_workdir() as workdir:
        for seed in seeds:
            setup = _peers.Setup(k=setting.k, n_features=setting.n_features, d_in=data.d_in, steps=setting.steps,
                                 batch_size=setting.batch_size, lr=setting.lr or 2e-3, seed=seed)
            run_started = time.perf_counter()
            result = bench_peers.run_seed(factories, data, setup, Path(workdir))
            for system in result["systems"].values():
                system.pop("step_ms", None)
            runs.append({**result, "seconds": time.perf_counter() - run_started})
            payload.update(runs=runs, wall_seconds=time.perf_counter() - started, complete=False)
            write_json(path, payload)
    payload["complete"] = True
    write_json(path, payload)
    return payload


def _peers_family(name: str) -> str:
    import _peers

    return _peers.SYSTEMS[name].family


def _peers_available(name: str) -> bool:
    import _peers

    return _peers.available(_peers_family(name))


# ------------------------------------------------------------------------------------------- CLI


def read_setting(text: str) -> dict:
    """--setting: a JSON object or a file holding one (a handoff file: its "setting" key)."""
    path = Path(text)
    value = json.loads(path.read_text()) if path.exists() else json.loads(text)
    if isinstance(value, dict) and "setting" in value:
        value = value["setting"]
    if not isinstance(value, dict):
        raise SystemExit(f"--setting must be a JSON object (or a file with one), got {text!r}")
    return value


def make_setting(base: Setting, overrides: dict) -> Setting:
    known = {f.name for f in fields(Setting)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"setting has unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    if "ks" in overrides:
        overrides = {**overrides, "ks": tuple(overrides["ks"])}
    return replace(base, **overrides)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated, from: " + ", ".join(RULES))
    parser.add_argument("--aux", default=",".join(AUX), help="grid and synthetic: comma-separated, from none,k,zipf")
    parser.add_argument("--setting", help="grid (and peers) setting: JSON object or a file with one (key 'setting' "
                        "if it has one), keys of study.Setting, e.g. {\"n_features\": 16384, \"steps\": 400}")
    parser.add_argument("--ksweep-setting", help="the same for the k-sweep")
    parser.add_argument("--synthetic-setting", help="the same for the synthetic part")
    parser.add_argument("--confirm-setting", help="the same for the confirm part")
    parser.add_argument("--aux-zipf-options", default="{}",
                        help="TrainConfig fields for the aux=zipf runs (JSON; default: none, i.e. TrainConfig's "
                        "aux_zipf_loss, chosen by issue 13 part 1); the aux_zipf fields in effect are part of the "
                        "runs' key, so other options (or another TrainConfig default) rerun only those runs")
    parser.add_argument("--redo", action="append", default=[], help="KEY=VALUE: rerun the runs whose field KEY is "
                        "VALUE (e.g. aux=zipf), repeatable")
    parser.add_argument("--peer-systems", default=",".join(PEER_SYSTEMS), help="peers part: bench_peers systems")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out-dir", type=Path, help="results and figures (default benchmarks/results; --quick: "
                        "runs/study-quick)")
    parser.add_argument("--readme", type=Path, help="README to update (default README.md; not with --quick)")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only the figures and the README section")
    parser.add_argument("--quick", action="store_true", help="tiny data and few steps, one seed (for the test)")
    args = parser.parse_args(argv)
    args.command = " ".join(["benchmarks/study.py", *(argv if argv is not None else sys.argv[1:])])
    args.parts = [p.strip() for p in args.parts.split(",")]
    args.rules = [r.strip() for r in args.rules.split(",")]
    args.aux = [a.strip() for a in args.aux.split(",")]
    for name, values, allowed in (("--parts", args.parts, PARTS), ("--rules", args.rules, RULES),
                                  ("--aux", args.aux, AUX)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    args.peer_systems = [name.strip() for name in args.peer_systems.split(",")]
    args.aux_zipf_options = json.loads(args.aux_zipf_options)
    if args.quick:
        args.seeds = "0" if args.seeds == "0,1,2" else args.seeds
    args.seeds = [int(s) for s in args.seeds.split(",")]
    base = QUICK if args.quick else DEFAULTS
    args.settings, args.setting_source = {}, {}
    for part in PARTS:
        text = {"grid": args.setting, "peers": args.setting, "ksweep": args.ksweep_setting,
                "synthetic": args.synthetic_setting, "confirm": args.confirm_setting}[part]
        args.settings[part] = make_setting(base[part], read_setting(text)) if text else base[part]
        args.setting_source[part] = text
    if args.out_dir is None:
        args.out_dir = Path("runs/study-quick") if args.quick else _common.RESULTS
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        for part in args.parts:
            path = args.out_dir / f"study_{part}_cpu.json"
            setting = args.settings[part]
            if part == "peers":
                payload = run_peers(setting, args.seeds, path, args)
                print(f"[peers] {payload.get('skipped', 'done')}", flush=True)
            else:
                payload = run_part(part, setting, args.seeds, path, args, log=lambda line: print(line, flush=True))
                print(f"wrote {path} ({payload['wall_seconds']:.0f} s)", flush=True)
    readme = args.readme or (None if args.quick or args.no_readme else _common.README)
    section = study_report.report(args.out_dir, readme)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
