"""Structural shrinking of a failing score matrix: delete rows and columns, simplify entries.

Hypothesis shrinks entries well but rarely drops a row or column from the middle of a matrix (the
shape is drawn first, so a smaller shape misaligns every later draw), and shrinking a large matrix
costs it thousands of replays. This pass keeps any change after which the rule still fails some
check, sweeping until no change helps: the result cannot lose a row, a column or a nonzero entry,
or simplify an entry to 0, +-1 or an integer, and still fail (within MAX_ATTEMPTS evaluations).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

MAX_ATTEMPTS = 400  # bound on rule evaluations; one sweep costs at most 1 + n + F + 4 n F


def shrink_matrix(
    scores: torch.Tensor,
    still_fails: Callable[[torch.Tensor], Optional[object]],
    min_tokens: int,
    min_features: int,
    result: Optional[object] = None,
) -> tuple:
    """Return (scores, result) for the smallest failing matrix found from ``scores``.

    ``still_fails(candidate)`` returns a truthy failure record when ``candidate`` fails, else None;
    ``result`` is the record for ``scores`` itself when already known.
    Sweeps until a fixed point: halving every entry at once (rounded), deleting each row (down to
    ``min_tokens``) and each column (down to ``min_features``), then setting each entry to 0, to +-1
    (its sign), to its rounding, or one step nearer 0.
    """
    result = result or still_fails(scores)
    if not result:
        return scores, result
    budget = [MAX_ATTEMPTS]

    def attempt(candidate: torch.Tensor):
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        return still_fails(candidate)

    changed = True
    while changed and budget[0] > 0:
        changed = False
        halved = torch.round(scores / 2)  # all entries at once: keeps sums vs. single entries in balance
        if not torch.equal(halved, scores):
            outcome = attempt(halved)
            if outcome:
                scores, result, changed = halved, outcome, True
        for i in reversed(range(scores.shape[0])):  # backwards: a deletion leaves lower indices valid
            if scores.shape[0] > min_tokens:
                candidate = torch.cat([scores[:i], scores[i + 1:]], dim=0)
                outcome = attempt(candidate)
                if outcome:
                    scores, result, changed = candidate, outcome, True
        for j in reversed(range(scores.shape[1])):
            if scores.shape[1] > min_features:
                candidate = torch.cat([scores[:, :j], scores[:, j + 1:]], dim=1)
                outcome = attempt(candidate)
                if outcome:
                    scores, result, changed = candidate, outcome, True
        for i in range(scores.shape[0]):
            for j in range(scores.shape[1]):
                for simpler in _simpler_values(scores[i, j].item()):
                    candidate = scores.clone()
                    candidate[i, j] = simpler
                    outcome = attempt(candidate)
                    if outcome:
                        scores, result, changed = candidate, outcome, True
                        break
    return scores, result


def _simpler_values(value: float) -> list:
    """0, the sign (+-1), the rounding of ``value`` and one step nearer 0 from it, kept only when
    simpler by (non-integer, |x|), a well-founded order, so the pass cannot cycle."""
    def key(x: float) -> tuple:
        return (x != round(x), abs(x))

    sign = 1.0 if value > 0 else -1.0
    candidates = (0.0, sign, float(round(value)), float(round(value)) - sign)
    return [c for c in dict.fromkeys(candidates) if key(c) < key(value)]
