"""``allocation verify module:function``: check a rule against the exact optimum, print the report.

Exit code 0 when the rule was feasible and optimal on every example, 1 with a counterexample
(2 for bad arguments, as for every sub-command).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..constraints import Constraints
from ..errors import AllocationError
from ..verification import verify

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="prove or refute an allocation rule against the exact optimum",
        description="Draw score matrices with hypothesis, run RULE on each and check feasibility "
        "(caps, positive scores only) and optimality against the exact LP optimum. Prints the "
        "shrunk counterexample if there is one. Exit code 0: verified, 1: refuted.",
    )
    parser.add_argument("rule", metavar="module:function",
                        help="the rule, scores (n, F) tensor -> bool mask or activations; the module is "
                        "imported from the current directory (a path like rules.py:my_rule works too)")
    parser.add_argument("--per-token", type=int, metavar="K", help="each token keeps at most K features")
    parser.add_argument("--per-feature", type=int, metavar="M", help="each feature keeps at most M tokens")
    parser.add_argument("--total", type=int, metavar="B", help="at most B entries in the whole matrix")
    parser.add_argument("--examples", type=int, default=200, metavar="N", help="examples (default 200)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="hypothesis seed (default 0)")
    parser.add_argument("--min-tokens", type=int, default=1, help="fewest rows (default 1)")
    parser.add_argument("--max-tokens", type=int, default=8, help="most rows (default 8)")
    parser.add_argument("--min-features", type=int, default=1, help="fewest columns (default 1)")
    parser.add_argument("--max-features", type=int, default=8, help="most columns (default 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="device of the scores (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rule = load_rule(args.rule)
    constraints = Constraints(per_token=args.per_token, per_feature=args.per_feature, total=args.total)
    report = verify(
        rule,
        constraints,
        examples=args.examples,
        seed=args.seed,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        min_features=args.min_features,
        max_features=args.max_features,
        dtype=DTYPES[args.dtype],
        device=args.device,
    )
    print(f"rule {args.rule} under {constraints}")
    print(report)
    return 0 if report.ok else 1


def load_rule(spec: str) -> Callable:
    """Import ``module:attribute`` (dotted names allowed) or ``path/to/file.py:attribute``."""
    module_name, separator, attribute = spec.rpartition(":")
    if not separator or not module_name or not attribute:
        raise AllocationError(f"rule must look like module:function (e.g. my_rules:greedy), got {spec!r}")
    if os.getcwd() not in sys.path:  # `python -m` adds it, the `allocation` script does not
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError, SyntaxError) as error:
        raise AllocationError(f"cannot import {module_name!r} for the rule: {error}") from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AllocationError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise AllocationError(f"{spec} is a {type(target).__name__}, not a callable rule")
    return target


def _import_file(path: Path):
    if not path.is_file():
        raise ImportError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
