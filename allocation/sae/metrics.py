"""Training statistics: feature usage (dead / under-used), L0 spread, feature density, FVU windows.

State that must survive a checkpoint (``FeatureUsage``, ``MetricsWindow``) exposes
``state_dict()`` / ``load_state_dict()`` with tensors only, so resuming is exact.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .._masks import count_selected
from .._validate import positive_int

DENSITY_BINS = tuple(range(-8, 1))  # log10 firing-frequency bin edges: 1e-8 .. 1
UNDER_USED_FACTOR = 0.1
"""A feature is under-used when it fires less than this fraction of the uniform share (budget per token / F)."""


class FeatureUsage:
    """Per-feature firing counters.

    ``tokens_since_fired[j]``: tokens seen since feature j last had an activation > 0; a feature is
    dead when that reaches ``dead_tokens`` (N counted in tokens, not steps). ``frequency`` is an
    exponential moving average of the firing frequency (activations per token) with a memory of
    about ``window_tokens`` tokens, bias-corrected; aux_zipf_loss ranks features by it.
    """

    def __init__(self, n_features: int, *, dead_tokens: int = 10_000_000, window_tokens: int = 1_000_000):
        self.n_features = n_features
        self.dead_tokens = positive_int(dead_tokens, "dead_tokens")
        self.window_tokens = positive_int(window_tokens, "window_tokens")
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.int64)
        self.frequency_sum = torch.zeros(n_features, dtype=torch.float64)
        self.frequency_weight = torch.zeros((), dtype=torch.float64)
        self.tokens_seen = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, mask: Tensor) -> None:
        """Record one batch's kept mask (n, F)."""
        self.record(count_selected(mask, dim=0), mask.shape[0])

    @torch.no_grad()
    def record(self, fired_counts: Tensor, n_tokens: int) -> None:
        """Record one batch of ``n_tokens`` tokens from its kept entries per feature (F,)."""
        fired_counts = fired_counts.cpu()
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired_counts > 0] = 0
        decay = math.exp(-n_tokens / self.window_tokens)
        self.frequency_sum.mul_(decay).add_(fired_counts.to(torch.float64) / n_tokens, alpha=1 - decay)
        self.frequency_weight.mul_(decay).add_(1 - decay)
        self.tokens_seen += n_tokens

    @property
    def dead(self) -> Tensor:
        """(F,) bool: no activation > 0 in the last ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @property
    def frequency(self) -> Tensor:
        """(F,) float64 recent firing frequency (activations per token)."""
        if float(self.frequency_weight) == 0.0:
            return torch.zeros(self.n_features, dtype=torch.float64)
        return self.frequency_sum / self.frequency_weight

    def state_dict(self) -> Dict[str, Tensor]:
        names = ("tokens_since_fired", "frequency_sum", "frequency_weight", "tokens_seen")
        return {name: getattr(self, name).clone() for name in names}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        for name in ("tokens_since_fired", "frequency_sum", "frequency_weight", "tokens_seen"):
            getattr(self, name).copy_(state[name])


def l0_summary(counts: Tensor) -> Dict[str, float]:
    """Mean, min, median and max of per-token L0 from a histogram ``counts[l] = #tokens with L0 l``."""
    counts = counts.to(torch.int64)
    total = int(counts.sum())
    if total == 0:
        return {"mean": 0.0, "min": 0.0, "p50": 0.0, "max": 0.0}
    values = torch.arange(counts.numel(), dtype=torch.float64)
    present = torch.nonzero(counts).flatten()
    cumulative = counts.cumsum(0)
    median = int(torch.searchsorted(cumulative, torch.tensor((total + 1) // 2)))
    return {
        "mean": float((values * counts).sum() / total),
        "min": float(present[0]),
        "p50": float(median),
        "max": float(present[-1]),
    }


def density_histogram(frequency: Tensor, edges=DENSITY_BINS) -> Dict[str, List]:
    """Features per log10 firing-frequency bin; frequency exactly 0 is counted as 'never'."""
    frequency = frequency.detach().to(torch.float64).cpu()
    never = int((frequency <= 0).sum())
    log_freq = torch.log10(frequency[frequency > 0])
    bins = zip(edges[:-1], edges[1:], strict=True)
    counts = [int(((log_freq >= lo) & (log_freq < hi)).sum()) for lo, hi in bins]
    counts[-1] += int((log_freq >= edges[-1]).sum())  # frequency exactly 1 joins the top bin
    counts[0] += int((log_freq < edges[0]).sum())  # rarer than 1e-8 joins the bottom bin
    return {"log10_edges": list(edges), "counts": counts, "never": never}


class MetricsWindow:
    """Sums over the steps since the last report: squared error, variance, L0 histogram, firing, aux."""

    def __init__(self, n_features: int):
        self.n_features = n_features
        self.reset()

    def reset(self) -> None:
        self.squared_error = torch.zeros((), dtype=torch.float64)
        self.variance = torch.zeros((), dtype=torch.float64)
        self.l0_counts = torch.zeros(self.n_features + 1, dtype=torch.int64)
        self.fired = torch.zeros(self.n_features, dtype=torch.int64)
        self.tokens = torch.zeros((), dtype=torch.int64)
        self.steps = torch.zeros((), dtype=torch.int64)
        self.loss_sums = torch.zeros(3, dtype=torch.float64)  # main (normalized MSE), aux, total

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, mask: Tensor, main: float, aux: float, total: float) -> None:
        """Add one batch, from its kept mask (n, F)."""
        self.record(x, x_hat, count_selected(mask, dim=1), count_selected(mask, dim=0), main, aux, total)

    @torch.no_grad()
    def record(
        self, x: Tensor, x_hat: Tensor, l0: Tensor, fired: Tensor, main: float, aux: float, total: float,
        mean: Optional[Tensor] = None,
    ) -> None:
        """Add one batch from its kept entries per token ``l0`` (n,) and per feature ``fired`` (F,).

        ``mean``: the batch's mean (d,) when ``x`` is one rank's rows of it (default: x's own mean).
        """
        self.squared_error += float((x_hat - x).pow(2).sum())
        self.variance += float((x - (x.mean(dim=0) if mean is None else mean)).pow(2).sum())
        self.l0_counts += torch.bincount(l0.cpu(), minlength=self.n_features + 1)
        self.fired += fired.cpu()
        self.tokens += x.shape[0]
        self.steps += 1
        self.loss_sums += torch.tensor([main, aux, total], dtype=torch.float64)

    def summary(
        self, usage: FeatureUsage, budget_per_token: float, under_used_factor: float = UNDER_USED_FACTOR
    ) -> dict:
        """FVU, L0 spread, dead and under-used fractions, density histogram and mean losses."""
        steps = max(int(self.steps), 1)
        tokens = max(int(self.tokens), 1)
        frequency = self.fired.to(torch.float64) / tokens
        uniform_share = budget_per_token / self.n_features
        return {
            "fvu": float(self.squared_error / self.variance.clamp_min(1e-30)),
            "l0": l0_summary(self.l0_counts),
            "dead_fraction": float(usage.dead.to(torch.float64).mean()),
            "under_used_fraction": float((frequency < under_used_factor * uniform_share).double().mean()),
            "density": density_histogram(frequency),
            "main_loss": float(self.loss_sums[0] / steps),
            "aux_loss": float(self.loss_sums[1] / steps),
            "loss": float(self.loss_sums[2] / steps),
            "window_tokens": int(self.tokens),
        }

    def state_dict(self) -> Dict[str, Tensor]:
        return {
            name: getattr(self, name).clone()
            for name in ("squared_error", "variance", "l0_counts", "fired", "tokens", "steps", "loss_sums")
        }

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)


@torch.no_grad()
def evaluate(sae, batches, *, max_batches: Optional[int] = None) -> dict:
    """Eval-mode FVU and L0 spread of ``sae`` over (n, d_in) batches (thresholds: no batch mates)."""
    was_training = sae.training
    sae.eval()
    window = MetricsWindow(sae.n_features)
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(sae.W_enc.device)
            out = sae(batch)
            window.update(batch, out.x_hat, out.mask, 0.0, 0.0, 0.0)
    finally:
        sae.train(was_training)
    tokens = max(int(window.tokens), 1)
    frequency = window.fired.to(torch.float64) / tokens
    return {
        "fvu": float(window.squared_error / window.variance.clamp_min(1e-30)),
        "l0": l0_summary(window.l0_counts),
        "tokens": int(window.tokens),
        "never_fired_fraction": float((frequency == 0).to(torch.float64).mean()),
        "density": density_histogram(frequency),
    }
