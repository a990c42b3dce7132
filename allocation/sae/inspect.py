"""Looking at features: top-activating tokens in context, firing frequencies, the density histogram.

    report = inspect_features("runs/demo/topk", features=[3, 17], n_random=4)
    print(format_report(report))                 # the terminal view
    Path("features.html").write_text(render_html(report))   # one self-contained page

The SAE encodes every stored activation row of its run (eval mode: thresholds, no batch mates), in
storage order; for every feature it keeps the ``top`` largest activations, their rows and how often
it fired (frequency = tokens with f_j > 0 / tokens scanned). Rows from ``data='hf'`` / ``'minilm'``
caches carry their token ids and windows, so each example shows the token with ``context`` tokens
either side from the same window; other data shows row numbers.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import AllocationError
from .metrics import density_histogram


@dataclass
class Example:
    """One top activation of a feature: its value, row and the text around the token."""

    value: float
    row: int
    token: str
    left: str = ""
    right: str = ""


@dataclass
class FeatureReport:
    """A feature's firing statistics and its top examples (largest activation first)."""

    index: int
    fired: int  # tokens on which f_j > 0
    frequency: float  # fired / tokens scanned
    max_value: float
    mean_when_firing: float
    examples: list = field(default_factory=list)


@dataclass
class InspectReport:
    """What :func:`inspect_features` found; ``density`` covers the whole dictionary."""

    title: str
    n_tokens: int
    n_features: int
    description: str
    features: list
    density: dict
    frequency: np.ndarray  # (F,) firing frequency of every feature


# --------------------------------------------------------------------------------------------------
# the scan


@torch.no_grad()
def scan(
    sae: Any, rows: Any, top: int, batch_size: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Encode ``rows`` (n, d) in order: per feature its firing count (F,), activation sum (F,), and the
    ``top`` largest activations (top, F) with their row indices (top, F) (-1 where fewer fired)."""
    n_features = sae.n_features
    batch_size = batch_size or max(64, min(4096, (1 << 24) // n_features))
    was_training = sae.training
    sae.eval()
    device = sae.W_enc.device
    fired = torch.zeros(n_features, dtype=torch.int64)
    total = torch.zeros(n_features, dtype=torch.float64)
    best_values = torch.full((top, n_features), -math.inf)
    best_rows = torch.full((top, n_features), -1, dtype=torch.int64)
    try:
        for start in range(0, rows.shape[0], batch_size):
            x = torch.from_numpy(np.array(rows[start : start + batch_size], dtype=np.float32)).to(device)
            code = sae.encode(x).float().cpu()  # (b, F): kept affinities, zeros elsewhere
            positive = code > 0
            fired += positive.sum(0)
            total += code.sum(0, dtype=torch.float64)
            candidates = torch.where(positive, code, torch.tensor(-math.inf))
            values = torch.cat([best_values, candidates])
            row_ids = torch.cat(
                [best_rows, torch.arange(start, start + x.shape[0]).unsqueeze(1).expand(-1, n_features)]
            )
            k = min(top, values.shape[0])
            best_values, where = values.topk(k, dim=0)
            best_rows = row_ids.gather(0, where)
    finally:
        sae.train(was_training)
    best_rows = torch.where(torch.isfinite(best_values), best_rows, torch.tensor(-1))
    return fired.numpy(), total.numpy(), best_values.numpy(), best_rows.numpy()


# --------------------------------------------------------------------------------------------------
# text of the rows


class RowText:
    """Token text of activation rows from a cache's token file (ids and windows) and its tokenizer."""

    def __init__(self, tokens: np.ndarray, tokenizer: Any) -> None:
        self.tokens, self.tokenizer = tokens, tokenizer
        joined = tokenizer.convert_tokens_to_string(["a", "b"])
        self.spaced = " " in joined  # WordPiece-style: pieces joined by spaces, '##' continues a word

    def pieces(self, ids: Sequence[int]) -> list[str]:
        out = []
        for token in self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
            if self.spaced and token.startswith("##"):
                out.append(token[2:])
            else:
                text = self.tokenizer.convert_tokens_to_string([token])
                out.append(" " + text if self.spaced else text)
        return out

    def example(self, row: int, value: float, context: int) -> Example:
        window = self.tokens[:, 1]
        low = max(0, row - context)
        high = min(len(self.tokens), row + context + 1)
        same = window[low:high] == window[row]
        indices = np.arange(low, high)[same]
        pieces = self.pieces(self.tokens[indices, 0])
        at = int(np.flatnonzero(indices == row)[0])
        left = "".join(pieces[:at]).lstrip()
        token = pieces[at] if at else pieces[at].lstrip()
        return Example(value, row, token, left, "".join(pieces[at + 1 :]))


def _row_text(metadata: dict) -> Optional[RowText]:
    from .hf import load_hf_model, read_tokens

    cache_path, model_path = metadata.get("cache_path"), metadata.get("model_path")
    if not cache_path or not model_path:
        return None
    tokens = read_tokens(Path(cache_path))
    if tokens is None or not Path(model_path).is_dir():
        return None
    return RowText(tokens, load_hf_model(model_path).tokenizer)


# --------------------------------------------------------------------------------------------------
# the report


def _open(run: Union[str, Path]) -> tuple[Any, Any]:
    from .data import load_activations
    from .downstream import open_run, run_config

    sae, source = open_run(run)
    if source is None:
        train = run_config(run).get("train", {})
        data = train.get("data", "synthetic")
        if data == "<array>":
            raise AllocationError(f"the run {str(run)!r} trained on an in-memory array; pass source= to inspect it")
        if data in ("hf", "minilm"):
            raise AllocationError(
                f"the activation cache of the run {str(run)!r} is gone; pass source=load_activations(...) "
                "with the run's data options to extract it again"
            )
        source = load_activations(data, **train.get("data_options", {}))
    return sae, source


def inspect_features(
    run: Union[str, Path, None] = None,
    *,
    sae: Any = None,
    source: Any = None,
    features: Optional[Sequence[int]] = None,
    n_random: int = 8,
    top: int = 10,
    context: int = 8,
    max_tokens: Optional[int] = None,
    seed: int = 0,
) -> InspectReport:
    """Top-activating tokens (with ``context`` tokens either side) of ``features`` (default: ``n_random``
    random features among those that fired), every feature's firing frequency and the density histogram.

    Give a run directory (``--out`` of ``allocation train``, or ``RUN/<rule>``), or ``sae`` and
    ``source`` (an activation source, e.g. ``load_activations('hf', ...)``). ``max_tokens``: scan only
    the first rows (default all of a finite source; 16,384 sampled rows of an endless one).
    """
    for name, value in (("top", top), ("n_random", n_random + 1), ("context", context + 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AllocationError(f"{name} must be a {'positive' if name == 'top' else 'non-negative'} integer")
    title = "SAE"
    if run is not None:
        sae, opened = _open(run)
        source = source if source is not None else opened
        title = str(run)
    if sae is None or source is None:
        raise AllocationError("inspect_features needs a run directory, or both sae= and source=")
    metadata = getattr(source, "metadata", {}) or {}
    rows = getattr(source, "array", None)
    if rows is None:
        rows = source.sample(max_tokens or 16384, seed=seed).numpy()
    elif max_tokens is not None:
        rows = rows[:max_tokens]
    if rows.shape[1] != sae.d_in:
        raise AllocationError(f"the SAE has d_in={sae.d_in} but the activations have d={rows.shape[1]}")
    fired, total, best_values, best_rows = scan(sae, rows, top)
    n_tokens = int(rows.shape[0])
    frequency = fired / max(n_tokens, 1)
    if features is None:
        alive = np.flatnonzero(fired > 0)
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(alive, size=min(n_random, len(alive)), replace=False).tolist()) if len(alive) else []
    else:
        chosen = [int(f) for f in features]
        bad = [f for f in chosen if not 0 <= f < sae.n_features]
        if bad:
            raise AllocationError(f"features {bad} do not exist: this SAE has features 0 to {sae.n_features - 1}")
    text = _row_text(metadata)
    reports = []
    for index in chosen:
        examples = []
        for value, row in zip(best_values[:, index], best_rows[:, index], strict=True):
            if row < 0:
                continue
            if text is not None:
                examples.append(text.example(int(row), float(value), context))
            else:
                examples.append(Example(float(value), int(row), f"row {int(row)}"))
        reports.append(
            FeatureReport(
                index=index,
                fired=int(fired[index]),
                frequency=float(frequency[index]),
                max_value=float(best_values[0, index]) if fired[index] else 0.0,
                mean_when_firing=float(total[index] / fired[index]) if fired[index] else 0.0,
                examples=examples,
            )
        )
    described = ", ".join(
        str(part)
        for part in (
            f"{getattr(sae.rule, 'name', type(sae.rule).__name__)} k={getattr(sae.rule, 'k', '?')}",
            f"F={sae.n_features}",
            metadata.get("model"),
            f"{metadata['site']} layer {metadata['layer']}" if "site" in metadata else None,
            metadata.get("corpus"),
        )
        if part
    )
    return InspectReport(
        title=title,
        n_tokens=n_tokens,
        n_features=sae.n_features,
        description=described,
        features=reports,
        density=density_histogram(torch.from_numpy(frequency)),
        frequency=frequency,
    )


# --------------------------------------------------------------------------------------------------
# views


def _bins(density: dict) -> list[tuple[str, int]]:
    edges = density["log10_edges"]
    labels = [f"1e{lo:g}..1e{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [("never", density["never"]), *zip(labels, density["counts"], strict=True)]


def _clip(text: str, width: int, left: bool) -> str:
    text = text.replace("\n", " ")
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if left else text[: width - 1] + "…"


def format_report(report: InspectReport, width: int = 36) -> str:
    """The report as terminal text: the density histogram, then one block per feature."""
    lines = [
        f"{report.title}: {report.description}; {report.n_tokens:,} tokens scanned",
        "",
        "feature density (features per firing frequency):",
    ]
    bins = _bins(report.density)
    peak = max(count for _, count in bins) or 1
    for label, count in bins:
        lines.append(f"  {label:>12} {count:6d} {'#' * round(40 * count / peak)}")
    for feature in report.features:
        lines += [
            "",
            f"feature {feature.index}: fires on {100 * feature.frequency:.3f}% of tokens ({feature.fired:,}), "
            f"max {feature.max_value:.3f}, mean when firing {feature.mean_when_firing:.3f}",
        ]
        if not feature.examples:
            lines.append("  (never fired on these tokens)")
        for example in feature.examples:
            left = _clip(example.left, width, left=True)
            right = _clip(example.right, width, left=False)
            lines.append(f"  {example.value:8.3f}  {left:>{width}} [{example.token.strip()}]{right}")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-bottom:.2em}
.stats{color:#555;margin:.2em 0 .6em}
table{border-collapse:collapse;width:100%}td{padding:2px 6px;border-bottom:1px solid #eee;vertical-align:top}
td.value{text-align:right;font-variant-numeric:tabular-nums;width:6em}
td.context{font-family:ui-monospace,monospace;white-space:pre-wrap}
mark{padding:0 2px;border-radius:3px}
section.feature{margin:1.5em 0;padding-top:.5em;border-top:2px solid #ddd}
nav a{margin-right:.6em}
"""


def _histogram_svg(report: InspectReport) -> str:
    bins = _bins(report.density)
    peak = max(count for _, count in bins) or 1
    bar, gap, height = 44, 6, 160
    parts = [
        f'<svg width="{len(bins) * (bar + gap) + 10}" height="{height + 50}" '
        'role="img" aria-label="feature density histogram">'
    ]
    for i, (label, count) in enumerate(bins):
        h = round(height * count / peak)
        x = 5 + i * (bar + gap)
        parts.append(
            f'<rect class="bin" x="{x}" y="{height - h + 15}" width="{bar}" height="{h}" fill="#4a7fb5">'
            f"<title>{html.escape(label)}: {count} features</title></rect>"
            f'<text x="{x + bar / 2}" y="{height - h + 11}" font-size="10" text-anchor="middle">{count}</text>'
            f'<text x="{x + bar / 2}" y="{height + 30}" font-size="9" text-anchor="middle">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: InspectReport) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts, no network)."""
    escape = html.escape
    body = [
        f"<h1>Features of {escape(report.title)}</h1>",
        f'<p class="stats">{escape(report.description)}; {report.n_tokens:,} tokens scanned; '
        f"{report.n_features:,} features, {report.density['never']:,} never fired</p>",
        "<h2>Feature density</h2>",
        '<p class="stats">features per firing frequency (share of tokens on which the feature is active)</p>',
        _histogram_svg(report),
        "<nav>" + "".join(f'<a href="#feature-{f.index}">{f.index}</a>' for f in report.features) + "</nav>",
    ]
    for feature in report.features:
        peak = feature.max_value or 1.0
        rows = []
        for example in feature.examples:
            alpha = max(0.15, min(1.0, example.value / peak))
            token = example.token.lstrip()
            lead = example.token[: len(example.token) - len(token)]
            rows.append(
                f'<tr class="example"><td class="value">{example.value:.3f}</td><td class="context">'
                f'{escape(example.left)}{escape(lead)}<mark style="background:rgba(255,140,0,{alpha:.2f})">'
                f"{escape(token)}</mark>{escape(example.right)}</td></tr>"
            )
        if not rows:
            rows.append('<tr><td colspan="2">never fired on these tokens</td></tr>')
        body.append(
            f'<section class="feature" id="feature-{feature.index}" data-feature="{feature.index}">'
            f"<h2>Feature {feature.index}</h2>"
            f'<p class="stats">fires on {100 * feature.frequency:.3f}% of tokens ({feature.fired:,}); '
            f"max {feature.max_value:.3f}; mean when firing {feature.mean_when_firing:.3f}</p>"
            f"<table>{''.join(rows)}</table></section>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Features of {escape(report.title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
