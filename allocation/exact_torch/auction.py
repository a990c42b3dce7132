"""Jacobi auction with epsilon-scaling for max <S, M> s.t. M 1 <= k, M^T 1 <= m, 1^T M 1 <= B.

Tokens are bidders with k_i slots; feature j sells m_j seats; the budget sells B units, and every
seat needs a unit. An assignment e = (i, j) holds one seat and one unit at the price t_e it bid.
The prices everyone faces are derived from the held prices (a laminar market: features inside the
budget):

    lambda  = min_e t_e              if the budget is full, else 0
    entry_j = min_{e in j} t_e       if feature j is full,  else lambda
    b_j     = entry_j - lambda       (>= 0; 0 unless feature j is full)

In one round every token with free slots and a positive profit S_ij - entry_j bids at once for its
r_i = (free slots) best unheld features, each at ``entry_j + (v_ij - w_i) + eps`` where w_i is its
(r_i + 1)-th best profit (or 0, the value of an empty slot). Each feature keeps its m_j highest
prices among held and new bids, then the whole matrix keeps the B highest. Within one eps-phase
the entry prices only rise, which gives eps-complementary slackness when no token bids any more:
with a_i = max(0, max_{j unheld} S_ij - entry_j), every held entry has S_ij - a_i - b_j - lambda
>= -eps and every unheld positive entry has S_ij - a_i - b_j - lambda <= 0 (Bertsekas' auction for
transportation problems, run in parallel).

Epsilon-scaling keeps assignments and prices between phases: when eps shrinks, held prices that
break eps-slackness are lowered to the most their token would pay (a reverse-auction step); an
entry that still breaks it leaves its token, and its seat goes to a *phantom* holder at the same
price (so no price falls mid-phase) unless no price depends on it. The forward auction then runs
at the new eps; phantoms nobody outbid are removed and the phase settles again. The loop is
bounded (rounds, clean-ups): the caller's certificate, not this argument, is what proves a mask.

Each token bids from its candidate features (its 4k + 16 largest scores) whenever that provably
gives the same bids as the full row (the best score outside them, minus lambda, cannot beat the
profit it must exceed); otherwise that row is done in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class AuctionResult:
    """Mask and prices of a settled auction (prices in float64, absent budget -> lambda 0)."""

    mask: Tensor  # (n, F) bool
    token_prices: Tensor  # (n,) float64, a_i >= 0
    feature_prices: Tensor  # (F,) float64, b_j >= 0
    budget_price: float  # lambda >= 0


CANDIDATES_PER_CAP = 4  # candidate features per token: 4 * max cap + 16, or all of them
CANDIDATES_EXTRA = 16
LOWERING_PASSES = 20  # reverse-auction passes at the start of a phase
MAX_SETTLES = 50  # restore-bid-clean cycles per phase before giving up
PHANTOM = -1  # token index of a seat whose token left it: it keeps its price until outbid


class Market:
    """The auction state: held assignments (token, feature, price) and the dense held mask."""

    def __init__(self, scores: Tensor, token_caps: Tensor, feature_caps: Tensor, budget: Optional[int]):
        self.scores = scores  # (n, F) float64
        self.n, self.f = scores.shape
        device = scores.device
        self.token_caps = token_caps  # (n,) int64
        self.feature_caps = feature_caps  # (F,) int64
        self.budget = budget
        self.tok = torch.zeros(0, dtype=torch.long, device=device)
        self.feat = torch.zeros(0, dtype=torch.long, device=device)
        self.price = torch.zeros(0, dtype=torch.float64, device=device)
        self.held = torch.zeros(self.n, self.f, dtype=torch.bool, device=device)
        self.quiet = torch.zeros(self.n, dtype=torch.bool, device=device)
        # candidate features of each token: its largest scores (bidding looks there first)
        width = min(self.f, CANDIDATES_PER_CAP * int(token_caps.max())
                    + CANDIDATES_EXTRA)
        top, at = scores.topk(min(width + 1, self.f), dim=1)
        self.cand_score, self.cand_index = top[:, :width].contiguous(), at[:, :width].contiguous()
        self.outside_max = top[:, width] if width < self.f else torch.full(
            (self.n,), float("-inf"), dtype=torch.float64, device=device)
        self.held_cand = torch.zeros(self.n, width, dtype=torch.bool, device=device)
        # position of feature j in token i's candidates, or -1 (int16 or int32: small next to S)
        position_type = torch.int16 if width < 2**15 else torch.int32
        self.cand_position = torch.full((self.n, self.f), -1, dtype=position_type, device=device)
        positions = torch.arange(width, dtype=position_type, device=device).expand(self.n, width)
        self.cand_position.scatter_(1, self.cand_index, positions)
        self._recount()

    # ----- derived quantities -------------------------------------------------------------
    def _recount(self) -> None:
        self.row_count = torch.bincount(self.tok[self.tok >= 0], minlength=self.n)
        self.col_count = torch.bincount(self.feat, minlength=self.f)
        self.free = self.token_caps - self.row_count

    def budget_full(self) -> bool:
        return self.budget is not None and self.price.numel() >= self.budget

    def prices(self):
        """(entry (F,), lambda): what a new seat in feature j costs, and the budget price."""
        lam = float(self.price.min()) if self.budget_full() and self.price.numel() else 0.0
        inf = torch.full((self.f,), float("inf"), dtype=torch.float64, device=self.scores.device)
        cheapest = inf.scatter_reduce(0, self.feat, self.price, reduce="amin", include_self=True)
        full = self.col_count >= self.feature_caps
        entry = torch.where(full, cheapest, torch.full_like(cheapest, lam))
        return entry, lam

    def best_unheld_profit(self, entry: Tensor, lam: float) -> Tensor:
        """max(0, max_{j unheld} S_ij - entry_j) per token."""
        values, _ = self._top_profits(None, entry, lam, torch.ones(self.n, dtype=torch.long))
        return values[:, 0].clamp(min=0.0)

    def _top_profits(self, rows: Optional[Tensor], entry: Tensor, lam: float, free: Tensor):
        """The free_i + 1 best unheld profits S_ij - entry_j of each token in ``rows``, best first.

        Returns (values, feature index), both (len(rows), width) with width = max(free) + 1 (at
        most F), -inf past a row's unheld features. Each token first looks only at its candidate
        features (its largest scores); that is exact when the profit it would need to beat, w_i,
        is at least (largest score outside the candidates) - lambda, since entry_j >= lambda.
        Other rows are done over all features. ``rows`` None means every token.
        """
        device = self.scores.device
        if rows is None:
            rows = torch.arange(self.n, device=device)
            cand, cand_score, cand_held = self.cand_index, self.cand_score, self.held_cand
            outside = self.outside_max
        else:
            cand, cand_score, cand_held = self.cand_index[rows], self.cand_score[rows], self.held_cand[rows]
            outside = self.outside_max[rows]
        free = free.to(device)
        width = min(int(free.max()) + 1, self.f)
        if width <= cand.shape[1] < self.f:
            profit = (cand_score - entry[cand]).masked_fill_(cand_held, float("-inf"))
            values, at = profit.topk(width, dim=1)
            index = cand.gather(1, at)
            needed = values.gather(1, (free.clamp(max=width - 1))[:, None]).squeeze(1).clamp(min=0.0)
            full_rows = torch.nonzero(outside - lam > needed).squeeze(1)  # candidates may miss one
        else:
            values = torch.empty((rows.numel(), width), dtype=torch.float64, device=device)
            index = torch.empty((rows.numel(), width), dtype=torch.long, device=device)
            full_rows = torch.arange(rows.numel(), device=device)
        if full_rows.numel():
            some = rows[full_rows]
            profit = (self.scores[some] - entry[None, :]).masked_fill_(self.held[some], float("-inf"))
            values[full_rows], index[full_rows] = profit.topk(width, dim=1)
        return values, index

    def _set_held(self, tok: Tensor, feat: Tensor, value: bool) -> None:
        """Mark (tok, feat) held or not, in the dense mask and in the candidate coordinates."""
        self.held[tok, feat] = value
        position = self.cand_position[tok, feat].long()
        hit = position >= 0
        self.held_cand[tok[hit], position[hit]] = value

    # ----- one bidding round --------------------------------------------------------------
    def bid_round(self, eps: float) -> bool:
        """All active tokens bid at once; returns False when no token had anything to bid."""
        active = torch.nonzero((self.free > 0) & ~self.quiet).squeeze(1)
        if active.numel() == 0:
            return False
        entry, lam = self.prices()
        free = self.free[active]
        values, index = self._top_profits(active, entry, lam, free)
        width = values.shape[1]
        slot = torch.arange(width, device=values.device)[None, :]
        has_next = free < width
        next_best = values.gather(1, free.clamp(max=width - 1)[:, None]).squeeze(1)
        threshold = torch.where(has_next, next_best.clamp(min=0.0), torch.zeros_like(next_best))
        bids = (slot < free[:, None]) & (values > 0)
        self.quiet[active] = ~bids[:, 0]
        if not bool(bids.any()):
            return True
        rows, cols = torch.nonzero(bids, as_tuple=True)
        bid_tok = active[rows]
        bid_feat = index[rows, cols]
        bid_price = entry[bid_feat] + (values[rows, cols] - threshold[rows]) + eps
        self._resolve(bid_tok, bid_feat, bid_price)
        return True

    def _resolve(self, bid_tok: Tensor, bid_feat: Tensor, bid_price: Tensor) -> None:
        """Each feature keeps its m_j highest prices, then the matrix keeps the B highest."""
        device = self.scores.device
        tok = torch.cat([self.tok, bid_tok])
        feat = torch.cat([self.feat, bid_feat])
        price = torch.cat([self.price, bid_price])
        is_new = torch.zeros(tok.numel(), dtype=torch.bool, device=device)
        is_new[self.tok.numel():] = True
        keep = torch.ones_like(is_new)

        bid_on = torch.zeros(self.f, dtype=torch.bool, device=device)
        bid_on[bid_feat] = True
        contested = torch.nonzero(bid_on[feat]).squeeze(1)
        order = torch.argsort(price[contested], descending=True, stable=True)
        order = order[torch.argsort(feat[contested][order], stable=True)]
        ranked = contested[order]
        group = feat[ranked]
        counts = torch.bincount(group, minlength=self.f)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(ranked.numel(), device=device) - start[group]
        keep[ranked[rank >= self.feature_caps[group]]] = False

        if self.budget is not None:
            kept = torch.nonzero(keep).squeeze(1)
            excess = kept.numel() - self.budget
            if excess > 0:
                cheapest = torch.topk(price[kept], excess, largest=False).indices
                keep[kept[cheapest]] = False

        lost = ~keep & ~is_new & (tok >= 0)
        won = keep & is_new
        self._set_held(tok[lost], feat[lost], False)
        self._set_held(tok[won], feat[won], True)
        self.quiet[tok[lost]] = False
        self.tok, self.feat, self.price = tok[keep], feat[keep], price[keep]
        self._recount()

    # ----- phase changes --------------------------------------------------------------------
    def restore_slackness(self, eps: float, lowering_passes: int = LOWERING_PASSES) -> None:
        """Make every held entry eps-slack again: S_ij - t_e >= max(0, best unheld profit) - eps.

        First lower the violating prices to S_ij - best_i + eps (a reverse-auction step; prices
        stay >= eps), a few passes since a lower price can raise another token's best profit. An
        entry that still violates loses its token: dropped if no price depends on it (its feature
        and the budget not full), else its seat and price go to a phantom holder, so that no price
        falls and no cascade starts. Either way the forward auction that follows ends eps-slack.
        """
        for _ in range(lowering_passes):
            ceiling = self._price_ceiling(eps)
            if ceiling is None or bool((self.price <= ceiling).all()):
                return
            lowered = torch.minimum(self.price, ceiling)
            lowered = torch.where(lowered >= eps, lowered, self.price)
            if bool((lowered == self.price).all()):
                break
            self.price = lowered
        ceiling = self._price_ceiling(eps)
        if ceiling is None:
            return
        violating = self.price > ceiling
        if not bool(violating.any()):
            return
        which = torch.nonzero(violating).squeeze(1)
        self._set_held(self.tok[which], self.feat[which], False)
        pinned = self.col_count[self.feat[which]] >= self.feature_caps[self.feat[which]]
        if self.budget_full():
            pinned[:] = True
        self.tok[which[pinned]] = PHANTOM
        keep = torch.ones_like(violating)
        keep[which[~pinned]] = False
        self.tok, self.feat, self.price = self.tok[keep], self.feat[keep], self.price[keep]
        self._recount()

    def remove_phantoms(self) -> bool:
        """Drop the phantom seats (their prices fall back); returns True if there were any."""
        real = self.tok >= 0
        if bool(real.all()):
            return False
        self.tok, self.feat, self.price = self.tok[real], self.feat[real], self.price[real]
        self._recount()
        return True

    def _price_ceiling(self, eps: float) -> Optional[Tensor]:
        """Highest price each held entry may carry to be eps-slack: S_ij - max(0, best_i) + eps."""
        if self.tok.numel() == 0:
            return None
        entry, lam = self.prices()
        best = self.best_unheld_profit(entry, lam)
        tok = self.tok.clamp(min=0)  # a phantom's ceiling is its own price: it never violates
        ceiling = self.scores[tok, self.feat] - best[tok] + eps
        return torch.where(self.tok >= 0, ceiling, self.price)

    def objective(self) -> float:
        """Sum of the held scores (float64)."""
        real = self.tok >= 0
        return float(self.scores[self.tok[real], self.feat[real]].sum())

    def count(self) -> int:
        return int((self.tok >= 0).sum())

    def result(self) -> AuctionResult:
        entry, lam = self.prices()
        token_prices = self.best_unheld_profit(entry, lam)
        feature_prices = (entry - lam).clamp_(min=0.0)
        closed = self.feature_caps == 0  # never sold: the price that keeps every score below it
        if bool(closed.any()):
            reduced = self.scores[:, closed] - token_prices[:, None] - lam
            feature_prices[closed] = reduced.max(dim=0).values.clamp_(min=0.0)
        return AuctionResult(self.held.clone(), token_prices, feature_prices, lam)


def settle(market: "Market", eps: float, max_rounds: int, max_settles: int = MAX_SETTLES) -> int:
    """Restore eps-slackness and bid at ``eps`` until no token bids and no phantom is left.

    Returns the rounds used, or -1 when ``max_rounds`` rounds or ``max_settles`` restorations did
    not settle it (the caller then falls back to the exact CPU solver).
    """
    rounds = 0
    for _ in range(max_settles):
        market.restore_slackness(eps)
        market.quiet.zero_()
        while market.bid_round(eps):
            rounds += 1
            if rounds >= max_rounds:
                return -1
        if not market.remove_phantoms():
            return rounds
    return -1
