"""``allocation train``: train SAEs (one rule, or several to compare); progress bar, summary table."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import AllocationError
from ..sae.model import RULE_NAMES
from ..sae.train import AUX_NAMES, TrainConfig, Trainer, TrainingExplodedWarning

DEFAULTS = TrainConfig()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train sparse autoencoders with TopK, Feature Choice or Mutual Choice",
        description="Train an SAE whose activation is an allocation rule, print a summary table, write "
        "checkpoints (cfg.json + sae.safetensors), metrics.jsonl, summary.json and a SAELens export "
        "under --out. "
        "Several comma-separated rules train one after another into --out/<rule> and are compared.",
    )
    parser.add_argument(
        "--rule",
        help=f"{' | '.join(RULE_NAMES)}, or several separated by commas (default topk)",
    )
    parser.add_argument(
        "--k", type=int, help=f"activations per token / budget k n per batch (default {DEFAULTS.k})"
    )
    parser.add_argument(
        "--n-features", type=int, help=f"dictionary size F (default {DEFAULTS.n_features})"
    )
    parser.add_argument(
        "--aux",
        choices=AUX_NAMES,
        help=f"auxiliary loss: none, k (aux_k_loss, dead features) or zipf (aux_zipf_loss); "
        f"default {DEFAULTS.aux}",
    )
    parser.add_argument(
        "--data",
        help="synthetic | minilm | hf (a local transformers model: --data-option model=DIR text=FILE layer=L) "
        "| PATH (.npy, .safetensors, memmap); default synthetic",
    )
    parser.add_argument(
        "--data-option",
        action="append",
        metavar="KEY=VALUE",
        help="option for the data source, e.g. layer=3 or n_tokens=50000 (repeatable)",
    )
    parser.add_argument(
        "--tokens", type=int, help=f"training tokens (default {DEFAULTS.tokens}); may grow on --resume"
    )
    parser.add_argument(
        "--out", type=Path, help="run directory (checkpoints, metrics, summary, SAELens export)"
    )
    parser.add_argument("--batch-size", type=int, help=f"default {DEFAULTS.batch_size}")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4 / sqrt(F / 2^14))")
    parser.add_argument(
        "--decoder-lr-scale",
        type=float,
        help=f"W_dec's learning rate is lr times this (default {DEFAULTS.decoder_lr_scale:g})",
    )
    parser.add_argument(
        "--encoder-init-scale",
        type=float,
        help=f"W_enc = c W_dec^T at init (default 1/sqrt(3) = {DEFAULTS.encoder_init_scale:.3f})",
    )
    parser.add_argument("--warmup-steps", type=int, help="default 5%% of the steps, at most 1000")
    parser.add_argument(
        "--decay-fraction",
        type=float,
        help="fraction of steps over which lr decays linearly to 0 (default 0.2)",
    )
    parser.add_argument("--grad-clip", type=float, help=f"default {DEFAULTS.grad_clip}")
    parser.add_argument(
        "--dead-tokens",
        type=int,
        help="a feature is dead after this many tokens without an activation (default 10M)",
    )
    parser.add_argument("--k-aux", type=int, help="auxiliary activations per token (default d_in // 2)")
    parser.add_argument(
        "--zipf-s", type=float, help=f"Zipf exponent s >= 0 of aux_zipf_loss (default {DEFAULTS.zipf_s})"
    )
    parser.add_argument("--decode", choices=("auto", "sparse", "dense"), help="default auto")
    parser.add_argument(
        "--metrics-every", type=int, help=f"steps between metrics (default {DEFAULTS.metrics_every})"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        help="steps between checkpoints (0, the default: only at the end); may change on --resume",
    )
    parser.add_argument(
        "--calibrate-l0",
        type=float,
        help="after training, also evaluate Feature/Mutual Choice at eval thresholds calibrated to this "
        "held-out L0 per token on a held-out calibration set (default: k; 0 skips it)",
    )
    parser.add_argument(
        "--downstream",
        action=argparse.BooleanOptionalAction,
        help="after training, splice the SAE into the model and report loss recovered (causal LMs) or "
        "embedding cosine (encoders) on held-out text (default: on where the data names its model: hf, minilm)",
    )
    parser.add_argument(
        "--downstream-tokens",
        type=int,
        help=f"held-out tokens of the downstream evaluation (default {DEFAULTS.downstream_tokens})",
    )
    parser.add_argument("--seed", type=int, help=f"default {DEFAULTS.seed}")
    parser.add_argument(
        "--device", help="torch device, e.g. cpu or cuda (default cpu); may change on --resume"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; 1 is best on busy shared cores)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out/checkpoint; options given must match it, except --tokens "
        "(more), --device, --checkpoint-every and --threads",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (a fresh run refuses a non-empty --out without it)",
    )
    parser.add_argument("--plot", type=Path, help="save a comparison figure (FVU curves, feature density)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


# TrainConfig fields that are command-line options of the same name (dest == field name)
CONFIG_OPTIONS = (
    "k",
    "n_features",
    "aux",
    "tokens",
    "batch_size",
    "lr",
    "decoder_lr_scale",
    "encoder_init_scale",
    "calibrate_l0",
    "warmup_steps",
    "decay_fraction",
    "grad_clip",
    "dead_tokens",
    "k_aux",
    "zipf_s",
    "decode",
    "metrics_every",
    "checkpoint_every",
    "seed",
    "device",
    "downstream",
    "downstream_tokens",
)


def _data_options(pairs: List[str]) -> Dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise AllocationError(f"--data-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def given_options(args: argparse.Namespace, rule: Optional[str]) -> Dict[str, Any]:
    """The TrainConfig fields the command line sets explicitly (options left out are not listed)."""
    given = {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name) is not None}
    if rule is not None:
        given["rule"] = rule
    if args.data is not None:
        given["data"] = args.data
    if args.data_option:
        given["data_options"] = _data_options(args.data_option)
    return given


def _trainer(args: argparse.Namespace, rule: Optional[str], out: Optional[Path]) -> Trainer:
    given = given_options(args, rule)
    if args.resume:
        return Trainer.resume(out, changes=given)
    data = given.pop("data", DEFAULTS.data)
    config = TrainConfig(**{"rule": DEFAULTS.rule, **given})
    return Trainer(config, data, out=out, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    from ..sae.report import plot_runs, summary_table

    if args.threads is not None:
        if args.threads < 1:
            raise AllocationError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    rules: List[Optional[str]] = [None]
    if args.rule is not None:
        rules = [rule.strip() for rule in args.rule.split(",") if rule.strip()]
        if not rules:
            raise AllocationError("--rule is empty; pass topk, feature-choice or mutual-choice")
    if args.resume and (args.out is None or len(rules) != 1):
        raise AllocationError("--resume needs --out DIR and at most one --rule (the checkpoint's)")
    if args.overwrite and args.out is None:
        raise AllocationError("--overwrite needs --out DIR (the run directory to replace)")
    outs = [args.out / rule if args.out is not None and len(rules) > 1 else args.out for rule in rules]
    # every run directory is checked (writable, empty or --overwrite / --resume) before any training
    trainers = [_trainer(args, rule, out) for rule, out in zip(rules, outs)]
    summaries, histories = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingExplodedWarning)  # printed below, once per run
        for trainer in trainers:
            summary = trainer.run(progress=not args.no_progress)
            summaries.append(summary)
            histories[f"{summary['rule']} (aux {summary['aux']})"] = trainer.history
            for message in summary.get("warnings", []):
                print(f"allocation train: warning ({summary['rule']}): {message}", file=sys.stderr)
    print(summary_table(summaries))
    sys.stdout.flush()
    if args.plot is not None:
        path = plot_runs(histories, summaries, args.plot, title=f"data: {args.data or DEFAULTS.data}")
        print(f"plot saved to {path}")
    if args.out is not None:
        print(f"runs saved under {args.out}")
    return 0
