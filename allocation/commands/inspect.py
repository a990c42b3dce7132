"""``allocation inspect RUN``: top-activating tokens of chosen or random features, in the terminal or as HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._validate import positive_int
from ..errors import AllocationError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what SAE features respond to: top-activating tokens in context, firing frequencies",
        description="Encode the run's activations with its SAE (eval mode) and show, for chosen or random "
        "features, the top-activating tokens with their surrounding text, the activation values and the "
        "firing frequency, plus the density histogram of the whole dictionary. Text in the terminal; "
        "--html FILE also writes one self-contained page (no network) for a browser.",
    )
    parser.add_argument("run", type=Path, help="run directory (--out of allocation train, or RUN/<rule>)")
    parser.add_argument("--features", help="comma-separated feature indices (default: --random of them)")
    parser.add_argument("--random", type=int, default=8, help="random features that fired (default 8)")
    parser.add_argument("--top", type=int, default=10, help="examples per feature (default 10)")
    parser.add_argument("--context", type=int, default=8, help="tokens of context either side (default 8)")
    parser.add_argument("--max-tokens", type=int, help="scan only the first N activation rows (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random feature choice")
    parser.add_argument("--html", type=Path, help="also write the report as a self-contained HTML file")
    parser.set_defaults(func=run)


def _features(text):
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise AllocationError(f"--features expects comma-separated integers, e.g. 3,17,42; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..sae.inspect import format_report, inspect_features, render_html

    if args.max_tokens is not None:
        positive_int(args.max_tokens, "--max-tokens")
    report = inspect_features(
        args.run,
        features=_features(args.features),
        n_random=args.random,
        top=args.top,
        context=args.context,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    print(format_report(report))
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(report), encoding="utf-8")
        print(f"\nHTML report written to {args.html}")
    return 0
