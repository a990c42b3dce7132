"""``allocation export RUN``: (re)write a finished run's SAELens export and summary.json from its checkpoint.

Repairs a run directory whose export or summary is missing or stale (a run killed while writing
them); ``--hook-name`` / ``--model-name`` fill in what the data source could not know.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..errors import AllocationError
from ..sae.train import Trainer, TrainingExplodedWarning


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="rewrite a finished run's SAELens export and summary.json from its checkpoint",
        description="Load RUN/checkpoint (integrity-checked), evaluate it again and write RUN/saelens "
        "(SAELens 6 format) and RUN/summary.json atomically. Use it to repair a run killed during its "
        "final writes, or to set the hook name of the export.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a directory `allocation train --out` wrote")
    parser.add_argument("--hook-name", help="the hook the activations were read at (SAELens metadata.hook_name)")
    parser.add_argument("--model-name", help="the model the activations came from (metadata.model_name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trainer = Trainer.resume(args.run_dir)
    if trainer.step < trainer.config.steps:
        raise AllocationError(
            f"the run in {str(args.run_dir)!r} stopped at step {trainer.step} of {trainer.config.steps}; "
            f"finish it first with `allocation train --resume --out {args.run_dir}`"
        )
    metadata = {"hook_name": args.hook_name, "model_name": args.model_name}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingExplodedWarning)
        summary = trainer.finish({k: v for k, v in metadata.items() if v is not None})
    for message in summary.get("warnings", []):
        print(f"allocation export: warning: {message}", file=sys.stderr)
    print(f"wrote {args.run_dir / 'saelens'} and {args.run_dir / 'summary.json'} (step {trainer.step})")
    return 0
