"""``allocation train``: train SAEs (one rule, or several to compare); progress bar, summary table."""

from __future__ import annotations

import argparse
import json
import sys
import typing
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._validate import positive_int
from ..errors import AllocationError
from ..sae.rules import rule_names
from ..sae.train import TrainConfig, Trainer, TrainingExplodedWarning, option_name

DEFAULTS = TrainConfig()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train sparse autoencoders with TopK, Feature Choice, Mutual Choice or mixed caps",
        description="Train an SAE whose activation is an allocation rule, print a summary table, write "
        "checkpoints (cfg.json + sae.safetensors), metrics.jsonl, summary.json and a SAELens export "
        "under --out. "
        "Several comma-separated rules train one after another into --out/<rule> and are compared. "
        "Every TrainConfig field is a flag (below, with its default).",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--out", type=Path, help="run directory (checkpoints, metrics, summary, SAELens export)"
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


def _value_type(annotation: Any) -> type:
    """int, float or str from a field's annotation (Optional[X] -> X)."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = arguments[0] if typing.get_origin(annotation) is typing.Union and arguments else annotation
    return base if base in (bool, int, float, str) else str


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``option_name``), help and choices from the field's metadata.

    Defaults are None (an option left out is not 'given', see ``given_options``); the help shows the
    field's default. Dict fields are repeatable KEY=VALUE flags.
    """
    hints = typing.get_type_hints(TrainConfig)
    for spec in fields(TrainConfig):
        help_text = spec.metadata.get("help", "").replace("%", "%%")
        flag = option_name(spec.name)
        if hints[spec.name] is dict or typing.get_origin(hints[spec.name]) is dict:
            parser.add_argument(flag, dest=spec.name, action="append", metavar="KEY=VALUE", help=help_text)
            continue
        default = getattr(DEFAULTS, spec.name)
        if default is not None:
            help_text += f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
        extra = {key: spec.metadata[key] for key in ("choices", "metavar") if key in spec.metadata}
        if _value_type(hints[spec.name]) is bool:  # --name / --no-name
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        parser.add_argument(flag, dest=spec.name, type=_value_type(hints[spec.name]), help=help_text, **extra)


def _key_values(pairs: List[str], flag: str) -> Dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise AllocationError(f"{flag} expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def given_options(args: argparse.Namespace, rule: Optional[str]) -> Dict[str, Any]:
    """The TrainConfig fields the command line sets explicitly (options left out are not listed)."""
    given: Dict[str, Any] = {}
    for spec in fields(TrainConfig):
        value = getattr(args, spec.name)
        if spec.name == "rule" or value is None:
            continue
        given[spec.name] = _key_values(value, option_name(spec.name)) if isinstance(value, list) else value
    if rule is not None:
        given["rule"] = rule
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
        import torch

        torch.set_num_threads(positive_int(args.threads, "--threads"))
    rules: List[Optional[str]] = [None]
    if args.rule is not None:
        rules = [rule.strip() for rule in args.rule.split(",") if rule.strip()]
        if not rules:
            raise AllocationError(f"--rule is empty; pass one of {', '.join(rule_names())}")
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
            if trainer.rank != 0:  # under torchrun rank 0 reports; the other ranks only train
                continue
            summaries.append(summary)
            histories[f"{summary['rule']} (aux {summary['aux']})"] = trainer.history
            for message in summary.get("warnings", []):
                print(f"allocation train: warning ({summary['rule']}): {message}", file=sys.stderr)
    if not summaries:
        return 0
    print(summary_table(summaries))
    sys.stdout.flush()
    if args.plot is not None:
        path = plot_runs(histories, summaries, args.plot, title=f"data: {args.data or DEFAULTS.data}")
        print(f"plot saved to {path}")
    if args.out is not None:
        print(f"runs saved under {args.out}")
    return 0
