"""VerificationReport: the verdict of ``verify`` and, on failure, a readable counterexample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..constraints import Constraints

# Matrices up to this many rows and columns are printed in full; larger ones are summarised.
PRINT_LIMIT = 12

MARKS = {(True, True): "B", (True, False): "R", (False, True): "O", (False, False): " "}


@dataclass(frozen=True)
class VerificationReport:
    """Outcome of ``allocation.verify(rule, constraints)``; ``bool(report)`` is ``report.ok``.

    On success only ``ok``, ``examples_run`` and the settings are set. On failure the fields hold
    the shrunk counterexample: the score matrix the rule saw, the rule's mask and objective (None
    when its output was unusable), an optimal mask and objective from the exact solver, the
    constraints resolved for that matrix, and ``check``, the first check that failed.
    """

    ok: bool
    examples_run: int  # examples checked (on failure: up to the first failure, before shrinking)
    seed: int
    check: Optional[str] = None  # e.g. "feasibility: per_token cap exceeded at token 0 (3 > 2)"
    scores: Optional[torch.Tensor] = None  # (n, F), dtype as given to the rule, on the CPU
    rule_mask: Optional[torch.Tensor] = None  # (n, F) bool, None when the output was unusable
    rule_objective: Optional[float] = None  # sum of the selected scores (float64, correctly rounded)
    optimal_mask: Optional[torch.Tensor] = None  # (n, F) bool, one optimal mask (ties: not unique)
    optimal_objective: Optional[float] = None
    constraints: Optional[Constraints] = None
    tolerance: Optional[float] = None  # the objective gap allowed on this counterexample
    rule_name: str = "rule"

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return (f"VERIFIED: {self.rule_name} was feasible and optimal on all {self.examples_run} "
                    f"examples (seed {self.seed}).")
        n_tokens, n_features = self.scores.shape
        lines = [
            f"REFUTED: {self.rule_name} failed after {self.examples_run} example(s) (seed {self.seed}); "
            f"shrunk counterexample: {n_tokens} x {n_features} scores, {self.scores.dtype}.",
            f"failed check:      {self.check}",
            f"constraints:       {_describe(self.constraints)}",
            f"rule objective:    {_number(self.rule_objective)}",
            f"optimal objective: {_number(self.optimal_objective)}",
        ]
        if self.check.startswith("optimality"):
            lines.append(f"gap:               {_number(self.optimal_objective - self.rule_objective)}"
                         f"  (tolerance {self.tolerance:.3g})")
        lines.append("")
        lines.extend(self._matrix_lines())
        return "\n".join(lines)

    def __repr__(self) -> str:
        if self.ok:
            return f"VerificationReport(ok=True, examples_run={self.examples_run}, seed={self.seed})"
        return (f"VerificationReport(ok=False, examples_run={self.examples_run}, seed={self.seed}, "
                f"check={self.check!r}, shape={tuple(self.scores.shape)})")

    def _matrix_lines(self) -> list:
        n_tokens, n_features = self.scores.shape
        if n_tokens > PRINT_LIMIT or n_features > PRINT_LIMIT:
            return ["(scores too large to print; see report.scores, report.rule_mask, report.optimal_mask)"]
        values = self.scores.to(torch.float64).numpy()
        texts = [[_score_text(self.scores, i, j) for j in range(n_features)] for i in range(n_tokens)]
        rule = self.rule_mask.numpy() if self.rule_mask is not None else np.zeros(values.shape, bool)
        optimal = self.optimal_mask.numpy()
        width = max(4, max(len(text) for row in texts for text in row))
        header = "scores, marked  R = rule only, O = optimum only, B = both"
        if self.rule_mask is None:
            header = "scores, marked  O = optimum (the rule's output was unusable)"
        lines = [header + ":"]
        lines.append("       " + "".join(f"{f'f{j}':>{width + 2}}" for j in range(n_features)))
        for i in range(n_tokens):
            cells = "".join(f"{texts[i][j]:>{width}} {MARKS[(bool(rule[i, j]), bool(optimal[i, j]))]}"
                            for j in range(n_features))
            lines.append(f"  {f't{i}':<4} {cells}")
        lines.append(f"scores as a literal: {_literal(texts)}")
        return lines


def _score_text(scores: torch.Tensor, i: int, j: int) -> str:
    """Shortest text that round-trips the entry in its own dtype (float32: 0.1, not 0.100000001)."""
    value = scores[i, j].item()
    if scores.dtype == torch.float16:
        text = str(np.float16(value))
    elif scores.dtype in (torch.float32, torch.bfloat16):
        text = str(np.float32(value))
    else:
        text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _literal(texts: list) -> str:
    return "[" + ", ".join("[" + ", ".join(row) + "]" for row in texts) + "]"


def _number(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.10g}"


def _describe(constraints: Optional[Constraints]) -> str:
    """Constraints with vector caps printed in full (the counterexample is small)."""
    if constraints is None:
        return "n/a"
    parts = []
    for name in ("per_token", "per_feature", "total"):
        cap = getattr(constraints, name)
        if cap is not None:
            parts.append(f"{name}={cap.tolist() if isinstance(cap, np.ndarray) else cap}")
    return f"Constraints({', '.join(parts)})" if parts else "Constraints() (unconstrained)"
