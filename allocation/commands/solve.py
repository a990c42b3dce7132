"""``allocation solve``: the exact optimum of one score matrix, beside the torch rule's objective."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .._validate import check_fits_in_memory
from ..constraints import Constraints
from ..errors import AllocationError
from ..exact import BACKENDS, Allocation, solve
from ..rules import allocate
from ._shapes import parse_shape

LARGEST_PRINTED_MASK = (16, 48)
# Rough peak memory per matrix entry: float64 scores and their scaled copy, masks, and the LP over
# the positive entries (indices, constraint matrix, HiGHS' own copies).
BYTES_PER_ENTRY = 64


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "solve",
        help="solve one allocation problem exactly and compare with the torch rule",
        description="Solve max <S, M> under the given caps exactly (LP), print the mask summary, "
        "objective and dual prices, and the torch rule's objective beside it.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("scores", nargs="?", type=Path, help="score matrix, .npy or .csv (n_tokens x n_features)")
    source.add_argument("--random", metavar="NxF", help="generate an N x F standard normal matrix instead")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--topk", type=int, metavar="K", help="per-token cap: each token keeps at most K")
    parser.add_argument("--feature-choice", type=int, metavar="M", help="per-feature cap: at most M tokens each")
    parser.add_argument("--mutual-choice", type=int, metavar="B", help="total budget: at most B entries")
    parser.add_argument("--backend", choices=BACKENDS, default="scipy", help="exact backend (default scipy)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.topk is None and args.feature_choice is None and args.mutual_choice is None:
        raise AllocationError("give at least one of --topk K, --feature-choice M, --mutual-choice B")
    scores = _random_scores(args.random, args.seed) if args.random else _read_scores(args.scores)
    _check_fits(*scores.shape, "solving it")
    constraints = Constraints(per_token=args.topk, per_feature=args.feature_choice, total=args.mutual_choice)
    exact = solve(scores, constraints, backend=args.backend)
    rule_mask = allocate(torch.from_numpy(scores), constraints).numpy()
    print(_report(scores, constraints, exact, float(scores[rule_mask].sum())))
    return 0


def _random_scores(shape: str, seed: int) -> np.ndarray:
    n_tokens, n_features = parse_shape(shape, "--random", example="8x16")
    _check_fits(n_tokens, n_features, f"--random {n_tokens}x{n_features}")
    return np.random.default_rng(seed).standard_normal((n_tokens, n_features))


def _check_fits(n_tokens: int, n_features: int, what: str) -> None:
    check_fits_in_memory(
        n_tokens * n_features * BYTES_PER_ENTRY,
        f"{what} ({n_tokens} x {n_features} = {n_tokens * n_features:.3g} entries)",
        "pass a smaller matrix",
    )


def _read_scores(path: Path) -> np.ndarray:
    if path.is_dir():
        raise AllocationError(f"scores file {str(path)!r} is a directory; pass the .npy or .csv file inside it")
    if not path.is_file():
        raise AllocationError(f"scores file {str(path)!r} does not exist; pass a .npy or .csv path")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".csv":
            return np.loadtxt(path, delimiter=",", ndmin=2)
    except (ValueError, OSError) as error:
        raise AllocationError(f"could not read scores from {str(path)!r}: {error}") from error
    raise AllocationError(f"scores file must end in .npy or .csv, got {path.suffix!r}")


def _summary(values: np.ndarray) -> str:
    return f"min {values.min():.4g}  mean {values.mean():.4g}  max {values.max():.4g}"


def _report(scores: np.ndarray, constraints: Constraints, exact: Allocation, rule_objective: float) -> str:
    n_tokens, n_features = scores.shape
    mask = exact.mask
    lines = [
        f"scores: {n_tokens} tokens x {n_features} features, {int((scores > 0).sum())} positive",
        f"constraints: {constraints}",
        f"exact ({exact.backend}, {exact.seconds:.3f} s): selected {int(mask.sum())} entries, "
        f"objective {exact.objective:.6f}",
        f"  features per token: {_summary(mask.sum(axis=1))}",
        f"  tokens per feature: {_summary(mask.sum(axis=0))}",
    ]
    if exact.token_prices is not None:
        lines.append(f"  token prices:   {_summary(exact.token_prices)}")
    if exact.feature_prices is not None:
        lines.append(f"  feature prices: {_summary(exact.feature_prices)}")
    if exact.budget_price is not None:
        lines.append(f"  budget price:   {exact.budget_price:.6g}")
    gap = exact.objective - rule_objective
    lines.append(f"torch rule: objective {rule_objective:.6f} (gap to exact {gap:.3g})")
    if n_tokens <= LARGEST_PRINTED_MASK[0] and n_features <= LARGEST_PRINTED_MASK[1]:
        lines.append("mask (# selected, + positive not selected, . non-positive):")
        for row_scores, row_mask in zip(scores, mask):
            lines.append("  " + "".join("#" if m else ("+" if s > 0 else ".") for s, m in zip(row_scores, row_mask)))
    return "\n".join(lines)
