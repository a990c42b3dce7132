"""Human-readable output of training runs: the summary table and the comparison plot."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

COLUMNS = (
    ("rule", "rule"),
    ("aux", "aux"),
    ("k", "k"),
    ("F", "n_features"),
    ("tokens", "tokens"),
    ("train FVU", "train_fvu"),
    ("eval FVU (held-out)", "eval_fvu"),
    ("eval L0 (held-out)", "eval_l0.mean"),
    ("L0 min/p50/max", "eval_l0"),
    ("eval L0 (train split)", "eval_train_split_l0.mean"),
    ("FVU @ calibrated L0", "calibrated.eval_fvu"),
    ("calibrated L0 (held-out)", "calibrated.eval_l0.mean"),
    ("dead %", "dead_fraction"),
    ("under-used %", "under_used_fraction"),
    ("recovery", "feature_recovery"),
    ("CE clean/SAE/ablated", "downstream.ce"),
    ("loss recovered %", "downstream.loss_recovered"),
    ("KL (SAE)", "downstream.kl_sae"),
    ("cos (SAE)", "downstream.cosine_sae"),
    ("cos recovered %", "downstream.cosine_recovered"),
    ("tokens/s", "tokens_per_second"),
)
OPTIONAL = ("feature_recovery", "downstream.")  # columns shown only when some run has them


def _has(summary: dict, key: str) -> bool:
    if key == "feature_recovery":
        return "feature_recovery" in summary
    downstream = summary.get("downstream") or {}
    field = key[len("downstream.") :]
    return ("ce_sae" in downstream) if field == "ce" else field in downstream


def _cell(summary: dict, key: str) -> str:
    if key.startswith("downstream."):
        downstream = summary.get("downstream") or {}
        field = key[len("downstream.") :]
        if field == "ce":
            if "ce_sae" not in downstream:
                return "-"
            return f"{downstream['ce_clean']:.3f}/{downstream['ce_sae']:.3f}/{downstream['ce_ablated']:.3f}"
        value = downstream.get(field)
        if value is None:
            return "-"
        return f"{100 * value:.1f}" if field.endswith("recovered") else f"{value:.4f}"
    if key.startswith("calibrated."):
        calibrated = summary.get("calibrated")
        return _cell(calibrated, key[len("calibrated.") :]) if calibrated else "-"
    if key == "eval_l0":
        l0 = summary.get("eval_l0") or {}
        return f"{l0.get('min', 0):.0f}/{l0.get('p50', 0):.0f}/{l0.get('max', 0):.0f}"
    if key.endswith(".mean"):
        return f"{(summary.get(key[:-5]) or {}).get('mean', float('nan')):.2f}"
    value = summary.get(key)
    if value is None:
        return "-"
    if key in ("dead_fraction", "under_used_fraction"):
        return f"{100 * value:.1f}"
    if key in ("train_fvu", "eval_fvu", "feature_recovery"):
        return f"{value:.3f}"
    if key == "tokens_per_second":
        return f"{value:,.0f}"
    if key == "tokens":
        return f"{value:,}"
    return str(value)


def summary_table(summaries: Sequence[dict]) -> str:
    """A Markdown table, one row per run (columns that no run has are dropped)."""
    columns = [
        (title, key)
        for title, key in COLUMNS
        if not key.startswith(OPTIONAL) or any(_has(s, key) for s in summaries)
    ]
    rows = [[title for title, _ in columns]] + [[_cell(s, key) for _, key in columns] for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def plot_runs(
    histories: Dict[str, List[dict]],
    summaries: Sequence[dict],
    path: Union[str, Path],
    title: Optional[str] = None,
) -> Path:
    """Save a two-panel figure: training FVU against tokens, and the held-out feature-density histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        left.plot([h["tokens"] for h in history], [h["fvu"] for h in history], marker="o", label=label)
    left.set_xlabel("training tokens")
    left.set_ylabel("FVU (training window)")
    left.set_yscale("log")
    left.legend()
    left.set_title("reconstruction")
    for summary in summaries:
        density = summary.get("eval_density")
        if not density:
            continue
        edges = density["log10_edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        right.plot(
            centres, density["counts"], marker="o", label=f"{summary['rule']} ({density['never']} never)"
        )
    right.set_xlabel("log10 firing frequency (held-out)")
    right.set_ylabel("features")
    right.legend()
    right.set_title("feature density")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
