"""The README's "Does it work?" section and the study's figures, from the study's results files.

    report(results_dir, readme)   # figures into results_dir, the section into readme (None: not written)

Every figure and verdict is computed from ``study_<part>_cpu.json``. A comparison of two cells (mean
over seeds) counts as a difference only when the gap exceeds the sum of their standard deviations over
seeds: |mean_a - mean_b| > std_a + std_b; otherwise the two are "within noise".
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from allocation.sae.atomic import write_file  # noqa: E402
from allocation.sae.train import FIELDS_BEFORE_0_2  # noqa: E402

START, END = "<!-- study:start -->", "<!-- study:end -->"
RULE_LABELS = {"topk": "TopK", "feature-choice": "FC", "feature-choice-zipf": "FC Zipf s=1",
               "feature-choice-zipf-floor": "FC Zipf s=1, floor 1", "mutual-choice": "MC"}
AUX_LABELS = {"none": "none", "k": "aux_k", "zipf": "aux_zipf"}
BATCH_RULES = ("feature-choice", "feature-choice-zipf", "feature-choice-zipf-floor", "mutual-choice")
PARETO_FIGURE, DEAD_FIGURE = "study_pareto.png", "study_dead.png"


# ------------------------------------------------------------------------------------ aggregation


def mean_std(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    if any(math.isnan(v) for v in values):  # a metric the part does not measure (recovery off synthetic data)
        return {"mean": math.nan, "std": math.nan, "n": len(values)}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def equal_l0(run: dict) -> dict:
    """The run's figures at L0 = k: calibrated for a batch rule, as trained for TopK (its L0 is k)."""
    return run["calibrated"] or run["as_trained"]


METRICS = {
    "fvu_trained": lambda r: r["as_trained"]["fvu"],
    "l0_trained": lambda r: r["as_trained"]["l0"],
    "fvu": lambda r: equal_l0(r)["fvu"],
    "l0": lambda r: equal_l0(r)["l0"],
    "l0_std": lambda r: equal_l0(r)["l0_std"],
    "dead_train": lambda r: r["training"]["dead_fraction"],
    "under_train": lambda r: r["training"]["under_used_fraction"],
    "dead_eval": lambda r: equal_l0(r)["dead_fraction"],
    "under_eval": lambda r: equal_l0(r)["under_used_fraction"],
    "seconds": lambda r: r["seconds"],
    "recovery": lambda r: r.get("feature_recovery", float("nan")),
    "zero_cap": lambda r: r.get("zero_capacity_fraction", 0.0),
}


def cells(payload: dict) -> dict:
    """(rule, aux, k, tag) -> {metric: mean_std over seeds}; tag = '' or, for aux_zipf runs with other aux_zipf
    settings than the file's current ones, how they differ (an earlier formula, kept for comparison)."""
    current = payload.get("aux_zipf_config") or {}
    groups: dict = {}
    for run in payload["runs"]:
        config = run.get("aux_config") or {}
        tag = ", ".join(f"{name}={_field(config, name)}" for name in sorted(set(config) | set(current))
                        if _field(config, name) != _field(current, name)) if run["aux"] == "zipf" else ""
        groups.setdefault((run["rule"], run["aux"], run["k"], tag), []).append(run)
    rules, auxes = list(RULE_LABELS), list(AUX_LABELS)

    def order(key: tuple) -> tuple:  # aux, then tag (current first), then rule, then k
        rule, aux, k, tag = key
        return (auxes.index(aux) if aux in auxes else len(auxes), tag, rules.index(rule) if rule in rules else 99, k)

    return {key: {name: mean_std([get(r) for r in groups[key]]) for name, get in METRICS.items()}
            | {"seeds": len(groups[key])} for key in sorted(groups, key=order)}


def _field(settings: dict, name: str):
    """An aux_zipf field of a run; one left out is at the value of the formula before it (FIELDS_BEFORE_0_2)."""
    return settings.get(name, FIELDS_BEFORE_0_2.get(name))


def compare(a: dict, b: dict) -> str:
    """'lower' / 'higher' when a's mean is below / above b's by more than std_a + std_b, else 'same'."""
    gap, noise = a["mean"] - b["mean"], a["std"] + b["std"]
    if gap < -noise and gap < 0:
        return "lower"
    if gap > noise and gap > 0:
        return "higher"
    return "same"


# ---------------------------------------------------------------------------------------- format


def ms(stat: dict, digits: int = 3, percent: bool = False) -> str:
    if stat["mean"] != stat["mean"]:  # nan
        return "—"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}{unit}"


def pct(stat: dict) -> str:
    return ms(stat, 1, percent=True)


def cell_label(rule: str, aux: str, tag: str = "") -> str:
    label = f"{RULE_LABELS.get(rule, rule)} + {AUX_LABELS.get(aux, aux)}"
    return label + (f" ({tag})" if tag else "")


def describe_setting(payload: dict) -> str:
    s = payload["setting"]
    data = s["data"] + "".join(f", {k}={v}" for k, v in s["data_options"].items())
    extra = "".join(f", {k}={v}" for k, v in s.get("train_options", {}).items())
    ks = f"k in {{{', '.join(str(k) for k in s['ks'])}}}" if s.get("ks") else f"k = {s['k']}"
    return (f"{data}; {ks}, F = {s['n_features']}, {s['steps']} steps x {s['batch_size']} tokens "
            f"= {s['steps'] * s['batch_size']:,} training tokens, lr {s['lr']}, dead window {s['dead_tokens']:,} "
            f"tokens, {s['eval_tokens']:,} calibration / evaluation tokens{extra}; seeds {payload['seeds']}")


def cost(payload: dict) -> str:
    seconds = sum(r["seconds"] for r in payload["runs"])
    status = "" if payload.get("complete") else " (incomplete)"
    return f"{len(payload['runs'])} runs, {seconds / 60:.1f} min of training and evaluation{status}"


# ------------------------------------------------------------------------------------------ tables


def grid_table(table: dict) -> list[str]:
    lines = ["| rule + aux | seeds | FVU as trained @ L0 | FVU @ L0 = k | L0 std over tokens | dead (training) "
             "| under-used (training) | dead (eval) | under-used (eval) | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (rule, aux, _, tag), c in table.items():
        lines.append(f"| {cell_label(rule, aux, tag)} | {c['seeds']} | {ms(c['fvu_trained'], 4)} "
                     f"@ {c['l0_trained']['mean']:.1f} "
                     f"| {ms(c['fvu'], 4)} @ {c['l0']['mean']:.1f} | {c['l0_std']['mean']:.1f} "
                     f"| {pct(c['dead_train'])} | {pct(c['under_train'])} | {pct(c['dead_eval'])} "
                     f"| {pct(c['under_eval'])} | {c['seconds']['mean']:.0f} |")
    return lines


def ksweep_table(table: dict, ks: Sequence[int]) -> list[str]:
    rules = list(dict.fromkeys(rule for rule, *_ in table))
    lines = ["| rule | " + " | ".join(f"k = {k}: as trained / calibrated to k" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for rule in rules:
        row = []
        for k in ks:
            c = table.get((rule, "k", k, ""))
            row.append("—" if c is None else f"{ms(c['fvu_trained'], 4)} @ {c['l0_trained']['mean']:.1f} / "
                       f"{ms(c['fvu'], 4)} @ {c['l0']['mean']:.1f}")
        lines.append(f"| {RULE_LABELS.get(rule, rule)} | " + " | ".join(row) + " |")
    return lines


def topk_fvu_at(table: dict, ks: Sequence[int], l0: float) -> Optional[float]:
    """TopK's held-out FVU at L0 = l0, linear in log L0 between the two nearest swept k (None outside them)."""
    points = sorted((k, table[("topk", "k", k, "")]["fvu"]["mean"]) for k in ks if ("topk", "k", k, "") in table)
    for (k0, f0), (k1, f1) in zip(points, points[1:]):
        if k0 <= l0 <= k1:
            return f0 + (f1 - f0) * math.log(l0 / k0) / math.log(k1 / k0)
    return None


def interpolated_lines(table: dict, ks: Sequence[int]) -> list[str]:
    """Each calibrated batch rule against TopK's curve read at the L0 it actually kept (removes the L0 mismatch)."""
    items = []
    for k in ks:
        for rule in BATCH_RULES:
            c = table.get((rule, "k", k, ""))
            reference = topk_fvu_at(table, ks, c["l0"]["mean"]) if c else None
            if reference is not None:
                items.append(f"{RULE_LABELS[rule]} k={k}: {c['fvu']['mean']:.4f} @ {c['l0']['mean']:.1f} vs TopK "
                             f"{reference:.4f} ({c['fvu']['mean'] - reference:+.4f})")
    if not items:
        return []
    return ["Calibrated batch rules against TopK's curve read at the L0 they kept on the evaluation tokens (linear "
            "in log L0 between neighbouring k; removes the calibration's L0 mismatch): " + "; ".join(items) + ".", ""]


def synthetic_table(table: dict) -> list[str]:
    lines = ["| rule + aux | feature recovery | FVU @ L0 = k | dead (training) | under-used (training) |",
             "|---|---|---|---|---|"]
    for (rule, aux, _, tag), c in table.items():
        lines.append(f"| {cell_label(rule, aux, tag)} | {ms(c['recovery'])} | {ms(c['fvu'], 4)} "
                     f"| {pct(c['dead_train'])} | {pct(c['under_train'])} |")
    return lines


def zero_capacity_note(table: dict, setting: dict) -> list[str]:
    """Which rules' own training caps leave features no room at all (they count as dead in training)."""
    zero = {rule: c["zero_cap"]["mean"] for (rule, *_), c in table.items() if c["zero_cap"]["mean"] > 0}
    if not zero:
        return []
    parts = ", ".join(f"{RULE_LABELS.get(rule, rule)}: {value:.1%}" for rule, value in zero.items())
    return [f"Features whose per-feature cap in a training batch of {setting['batch_size']} tokens is 0 ({parts}): "
            "Zipf capacities m_j ∝ j^-s rounded to integers give the tail ranks no token, so those features can "
            "never fire in training and count as dead there, whatever the auxiliary loss does (as trained their "
            "thresholds keep them closed; calibrated on more tokens than a batch, their rescaled caps can reopen "
            "them). A capacity floor (`--min-capacity 1`, the 'floor 1' rows) gives every feature a token per batch.",
            ""]


def recovery_lines(table: dict) -> list[str]:
    """Each batch rule's feature recovery against TopK's with the same aux (the seeds' spread decides)."""
    outcomes, texts, _ = versus_topk([(table, list(AUX_LABELS), next(iter(table))[2], "")], "recovery", ms)
    if not outcomes:
        return []
    better = [label for label, outcome in outcomes if outcome == "higher"]
    worse = [label for label, outcome in outcomes if outcome == "lower"]
    return [f"Recovery against TopK with the same aux: higher for {', '.join(better) or 'no rule'}; lower for "
            f"{', '.join(worse) or 'no rule'} ({len(outcomes) - len(better) - len(worse)} within the seeds' spread).",
            ""]


def peers_lines(payload: Optional[dict]) -> list[str]:
    if payload is None:
        return ["Peers' TopK / BatchTopK reference rows: not run (no `study_peers_cpu.json`)."]
    if payload.get("skipped"):
        return [f"Peers' TopK / BatchTopK reference rows: skipped: {payload['skipped']}."]
    summary = _summarize_peers(payload["runs"])
    lines = ["Peers' reference rows (the peer benchmark's protocol, aux none, at the grid's k, F and steps):", "",
             "| system | FVU as trained @ L0 | FVU @ L0 = k (batch rules calibrated) | dead (eval) |",
             "|---|---|---|---|"]
    for name, s in summary.items():
        cal = s.get("calibrated") or s["as_trained"]
        lines.append(f"| {name} | {ms(s['as_trained']['fvu'], 4)} @ {s['as_trained']['l0']['mean']:.1f} "
                     f"| {ms(cal['fvu'], 4)} @ {cal['l0']['mean']:.1f} | {pct(s['as_trained']['dead_fraction'])} |")
    return lines


def _summarize_peers(runs: list[dict]) -> dict:
    names = runs[0]["systems"].keys()
    out = {}
    for name in names:
        per_seed = [run["systems"][name] for run in runs]
        out[name] = {block: ({key: mean_std([seed[block][key] for seed in per_seed])
                              for key in ("fvu", "l0", "dead_fraction")}
                             if all(seed[block] for seed in per_seed) else None)
                     for block in ("as_trained", "calibrated")}
    return out


# ---------------------------------------------------------------------------------------- verdicts


def verdict(outcomes: list[tuple[str, str]], wanted: str = "lower") -> str:
    """'**holds**' (every comparison goes the claimed way), '**does not hold**' (none does), or
    '**holds only for** ...' (the comparisons that do)."""
    wins = [label for label, outcome in outcomes if outcome == wanted]
    against = [label for label, outcome in outcomes if outcome not in (wanted, "same")]
    count = f"{len(wins)} of {len(outcomes)} comparisons the claimed way, {len(against)} the opposite way"
    if outcomes and len(wins) == len(outcomes):
        return f"**holds** ({count})"
    if not wins:
        return f"**does not hold** ({count}, the rest within the seeds' spread)"
    return f"**holds only for** {', '.join(wins)} ({count})"


def _pair(table: dict, a: tuple, b: tuple, metric: str, fmt) -> tuple[str, str]:
    ca, cb = table[a], table[b]
    outcome = compare(ca[metric], cb[metric])
    symbol = {"lower": "<", "higher": ">", "same": "≈"}[outcome]
    return outcome, f"{fmt(ca[metric])} {symbol} {fmt(cb[metric])}"


Block = tuple  # (cells table, auxes compared, k, label suffix): one block of comparisons with TopK


def versus_topk(blocks: Sequence[Block], metric: str, fmt) -> tuple[list, list, list]:
    """Each batch rule against TopK with the same aux and k, in every block: (outcomes, texts, keys)."""
    outcomes, texts, keys = [], [], []
    for table, auxes, k, where in blocks:
        for aux in auxes:
            base = ("topk", aux, k, "")
            for rule in BATCH_RULES:
                key = (rule, aux, k, "")
                if key in table and base in table:
                    outcome, text = _pair(table, key, base, metric, fmt)
                    outcomes.append((cell_label(rule, aux) + where, outcome))
                    texts.append(text)
                    keys.append((table, key, base))
    return outcomes, texts, keys


def by_rule(outcomes: list, keys: list, wanted: str = "lower") -> str:
    """'By rule: FC 5 of 5 the claimed way, ...': the outcomes counted per batch rule."""
    parts = []
    for rule in BATCH_RULES:
        mine = [o for (_, o), (_, key, _) in zip(outcomes, keys) if key[0] == rule]
        if mine:
            opposite = sum(o not in (wanted, "same") for o in mine)
            parts.append(f"{RULE_LABELS[rule]} {sum(o == wanted for o in mine)} of {len(mine)} the claimed way"
                         + (f" ({opposite} the opposite way)" if opposite else ""))
    return "By rule: " + "; ".join(parts) + "."


def claim_dead(blocks: Sequence[Block]) -> list[str]:
    outcomes, texts, keys = versus_topk(blocks, "dead_train", pct)
    details = []
    for (label, _), text, (table, key, base) in zip(outcomes, texts, keys):
        _, eval_text = _pair(table, key, base, "dead_eval", pct)
        zero = table[key]["zero_cap"]["mean"]
        structural = f"; {zero:.1%} of its features have training capacity 0" if zero else ""
        details.append(f"{label} vs TopK: {text} dead in training ({eval_text} on evaluation tokens at L0 = k"
                       f"{structural})")
    return [f"**Claim 1: FC and MC SAEs have fewer dead features than TopK at equal sparsity.** "
            f"{verdict(outcomes)} (dead in training, equal training budget k per token). {by_rule(outcomes, keys)}",
            "",
            *[f"- {d}" for d in details], ""]


def claim_fvu(blocks: Sequence[Block]) -> list[str]:
    outcomes, texts, keys = versus_topk(blocks, "fvu", lambda s: ms(s, 4))
    details = [f"{label}: FVU @ L0 = k {text} (TopK)" for (label, _), text in zip(outcomes, texts)]
    return [f"**Claim 2: FC and MC SAEs reconstruct better (lower FVU) than TopK at equal sparsity.** "
            f"{verdict(outcomes)} (held-out FVU, batch rules calibrated to L0 = k). {by_rule(outcomes, keys)}", "",
            *[f"- {d}" for d in details], ""]


def aux_versus_k(table: dict, rule: str, k: int, tag: str) -> Optional[tuple[str, str]]:
    """aux_zipf (the formula ``tag``, '' = current) against aux_k for one rule: (outcome, text) or None.

    Better ('lower') = fewer dead or fewer under-used features in training, and neither more.
    """
    zipf, aux_k = (rule, "zipf", k, tag), (rule, "k", k, "")
    if zipf not in table or aux_k not in table:
        return None
    dead, dead_text = _pair(table, zipf, aux_k, "dead_train", pct)
    under, under_text = _pair(table, zipf, aux_k, "under_train", pct)
    _, fvu_text = _pair(table, zipf, aux_k, "fvu", lambda s: ms(s, 4))
    outcome = ("lower" if "higher" not in (dead, under) and "lower" in (dead, under)
               else "higher" if "higher" in (dead, under) and "lower" not in (dead, under) else "same")
    return outcome, f"dead {dead_text}, under-used {under_text} (training); FVU @ L0 = k {fvu_text}"


def claim_aux(table: dict, rules: Sequence[str], k: int) -> list[str]:
    outcomes, details = [], []
    for rule in rules:
        found = aux_versus_k(table, rule, k, "")
        if found is not None:
            outcomes.append((RULE_LABELS[rule], found[0]))
            details.append(f"{RULE_LABELS[rule]}: aux_zipf vs aux_k: {found[1]}")
    versus_none = {rule: _pair(table, (rule, "zipf", k, ""), (rule, "none", k, ""), "dead_train", pct)
                   for rule in rules if (rule, "zipf", k, "") in table and (rule, "none", k, "") in table}
    more = [f"{RULE_LABELS[rule]} ({text})" for rule, (outcome, text) in versus_none.items() if outcome == "higher"]
    fewer = [f"{RULE_LABELS[rule]} ({text})" for rule, (outcome, text) in versus_none.items() if outcome == "lower"]
    if versus_none:
        details.append(f"against no auxiliary loss, aux_zipf leaves more dead features in training for "
                       f"{', '.join(more) or 'no rule'}, fewer for {', '.join(fewer) or 'no rule'}")
    earlier = sorted({tag for _, aux, _, tag in table if aux == "zipf" and tag})
    for tag in earlier:  # an earlier aux_zipf formula kept in the results: shown, not counted
        for rule in rules:
            found = aux_versus_k(table, rule, k, tag)
            if found is not None:
                details.append(f"{RULE_LABELS[rule]}, earlier formula ({tag}): aux_zipf vs aux_k: {found[1]}")
    return [f"**Claim 3: aux_zipf_loss mitigates dead and under-used features better than aux_k_loss.** "
            f"{verdict(outcomes)} (better = fewer dead or under-used features in training, neither more).", "",
            *[f"- {d}" for d in details], ""]


# ------------------------------------------------------------------------------------------ figures


def save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    write_file(path, buffer.getvalue())


def pareto_figure(table: dict, ks: Sequence[int], path: Path, title: str = "") -> None:
    """Held-out FVU vs L0 per rule over the k-sweep: as trained and calibrated to L0 = k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    rules = list(dict.fromkeys(rule for rule, *_ in table))
    for ax, (fvu, l0, name) in zip(axes, (("fvu_trained", "l0_trained", "as trained (eval thresholds)"),
                                          ("fvu", "l0", "calibrated to L0 = k"))):
        for rule in rules:
            points = [table[(rule, "k", k, "")] for k in ks if (rule, "k", k, "") in table]
            ax.errorbar([p[l0]["mean"] for p in points], [p[fvu]["mean"] for p in points],
                        yerr=[p[fvu]["std"] for p in points], marker="o", capsize=3, label=RULE_LABELS.get(rule, rule))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("held-out L0 (features per token)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out FVU")
    axes[0].legend()
    figure.suptitle(title, fontsize=9)
    save_figure(figure, path)
    plt.close(figure)


def dead_figure(table: dict, path: Path, title: str = "") -> None:
    """Dead and under-used fractions per rule (groups) and aux (colours), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(dict.fromkeys(rule for rule, _, _, tag in table if not tag))
    auxes = list(dict.fromkeys(aux for _, aux, _, tag in table if not tag))
    k = next(iter(table))[2]
    width = 0.8 / max(len(auxes), 1)
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("dead_train", "dead in training"), ("under_train", "under-used in training"),
              ("dead_eval", "never fire on evaluation tokens (L0 = k)"))
    for ax, (metric, name) in zip(axes, panels):
        for index, aux in enumerate(auxes):
            cells_ = [table.get((rule, aux, k, "")) for rule in rules]
            ax.bar([r + (index - (len(auxes) - 1) / 2) * width for r in range(len(rules))],
                   [100 * c[metric]["mean"] if c else 0 for c in cells_],
                   yerr=[100 * c[metric]["std"] if c else 0 for c in cells_], width=width, capsize=2,
                   label=AUX_LABELS.get(aux, aux))
        ax.set_xticks(range(len(rules)), [RULE_LABELS.get(rule, rule) for rule in rules])
        ax.set_ylabel("% of features")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="aux loss")
    figure.suptitle(title, fontsize=9)
    save_figure(figure, path)
    plt.close(figure)


# -------------------------------------------------------------------------------------------- report


def load(results: Path, part: str) -> Optional[dict]:
    path = results / f"study_{part}_cpu.json"
    return json.loads(path.read_text()) if path.exists() else None


def render(results: Path) -> str:
    """The section's markdown (figures referenced by path relative to the README)."""
    grid, sweep, synthetic, confirm, peers = (load(results, part)
                                              for part in ("grid", "ksweep", "synthetic", "confirm", "peers"))
    rel = _relative(results)
    lines = ["Generated by `make study` (`benchmarks/study.py`; `--report-only` rewrites this section) from "
             f"`{rel}/study_*_cpu.json`. Mean ± std over seeds; a difference counts only when the gap of the "
             "means exceeds the sum of the two standard deviations. FVU and L0 are held-out (the evaluation half "
             "of the held-out tokens); **@ L0 = k**: Feature Choice (FC) and Mutual Choice (MC) with their "
             "thresholds calibrated to L0 = k on the calibration half, TopK as it is (its L0 is k). Dead = no "
             "activation in the run's dead window (training) or on any evaluation token (eval, at L0 = k); "
             "under-used = firing on fewer than a tenth of the uniform share k / F of the tokens.", ""]
    payloads = [p for p in (grid, sweep, synthetic, confirm) if p is not None]
    total = sum(r["seconds"] for p in payloads for r in p["runs"])
    lines += [f"The whole study: {sum(len(p['runs']) for p in payloads)} runs, {total / 60:.0f} min of training and "
              f"evaluation summed over the runs, each on one CPU thread (torch "
              f"{payloads[0]['machine']['torch'] if payloads else '?'}; a 2-core machine shared with other jobs, "
              "up to three runs at a time, so a run's seconds include waiting for a core: see the load averages "
              "recorded with each run). `make study` runs them one after another.", ""]
    verdicts: list[str] = []
    if grid is not None and grid["runs"]:
        k = grid["setting"]["k"]
        table = cells(grid)
        lines += ["### The dead-feature setting: rules x auxiliary loss", "",
                  f"{describe_setting(grid)}. Setting: {grid.get('setting_source') or 'study.py defaults'}. "
                  f"aux_zipf_loss as configured (its TrainConfig fields that differ from the original formula's): "
                  f"`{json.dumps(grid.get('aux_zipf_config') or {})}`. Cost: {cost(grid)}.", "",
                  *grid_table(table), "", *zero_capacity_note(table, grid["setting"]),
                  f"![dead and under-used features]({rel}/{DEAD_FIGURE})", ""]
        blocks: list = [(table, grid["aux"], k, "")]
        if confirm is not None and confirm["runs"]:
            blocks.append((cells(confirm), ("none", "k"), confirm["setting"]["k"], " (part-1 setting)"))
        verdicts += claim_dead(blocks)
        if sweep is not None and sweep["runs"]:
            sweep_table = cells(sweep)
            blocks += [(sweep_table, ("k",), k_sweep, f" k={k_sweep} (sweep)") for k_sweep in sweep["setting"]["ks"]]
        verdicts += claim_fvu(blocks)
        verdicts += claim_aux(table, list(grid["rules"]), k)
    if sweep is not None and sweep["runs"]:
        ks = sweep["setting"]["ks"]
        smaller = ""
        if grid is not None:
            small, large = sweep["setting"], grid["setting"]
            smaller = (f" Smaller than the dead-feature setting (F = {small['n_features']} instead of "
                       f"{large['n_features']}, {small['steps'] * small['batch_size']:,} instead of "
                       f"{large['steps'] * large['batch_size']:,} training tokens) so that its runs fit "
                       "the CPU budget.")
        lines += ["### FVU vs L0 (k-sweep)", "",
                  f"{describe_setting(sweep)}; aux_k_loss (the default).{smaller} Cost: {cost(sweep)}.", "",
                  *ksweep_table(cells(sweep), ks), "", *interpolated_lines(cells(sweep), ks),
                  f"![FVU vs L0]({rel}/{PARETO_FIGURE})", ""]
    if synthetic is not None and synthetic["runs"]:
        lines += ["### Synthetic ground truth: feature recovery", "",
                  f"{describe_setting(synthetic)}. Feature recovery = mean over the true features of the best "
                  f"cosine with a decoder row (1 = every true feature found). Cost: {cost(synthetic)}.", "",
                  *synthetic_table(cells(synthetic)), "", *recovery_lines(cells(synthetic))]
    if confirm is not None and confirm["runs"]:
        lines += ["### Check at the larger dead-feature setting (no aux, aux_k_loss)", "",
                  f"{describe_setting(confirm)}. Setting: {confirm.get('setting_source')}. Cost: {cost(confirm)}.", "",
                  *grid_table(cells(confirm)), ""]
    lines += ["### Peers", "", *peers_lines(peers), ""]
    if verdicts:
        lines += ["### Verdicts", "", *verdicts]
    lines += ["### What this study could not settle", "",
               *not_settled(grid, confirm, [p for p in (grid, sweep, confirm) if p is not None and p["runs"]], peers),
               ""]
    return "\n".join(lines)


def not_settled(grid: Optional[dict], confirm: Optional[dict], payloads: Sequence[dict],
                peers: Optional[dict]) -> list[str]:
    def tokens(payload: Optional[dict]) -> int:
        return payload["setting"]["steps"] * payload["setting"]["batch_size"] if payload else 0

    ratios = [c["l0"]["mean"] / key[2] for payload in payloads for key, c in cells(payload).items()
              if key[0] in BATCH_RULES]
    lines = [f"- **Scale.** Every run here is CPU-sized ({tokens(grid):,} training tokens at the dead-feature "
             f"setting, {tokens(confirm):,} at the larger check, 2 shared cores, no GPU lent to this session); the "
             "paper trains on far more tokens and wider dictionaries. Dead features that appear only late in long "
             "runs, or vanish with more data, are outside what was measured.",
             "- **One model, one layer.** MiniLM-L6 layer 3 (the standard library's docstrings) only.",
             "- **Three seeds.** Differences smaller than the seeds' spread are reported as such, not as effects."]
    if ratios:
        lines.append(f"- **Equal L0 is approximate.** Calibrated on the calibration half, the batch rules keep "
                     f"{min(ratios):.3f} to {max(ratios):.3f} x k features per evaluation token (TopK: exactly k); "
                     "a batch rule above k is favoured in FVU by that much extra L0.")
    lines.append("- **aux_zipf at the larger setting**: the check there has no aux_zipf cells; issue 13 part 1's "
                 "`benchmarks/aux_variants.py` compares the aux_zipf variants there.")
    if peers is None or peers.get("skipped"):
        lines.append("- **Peers**: sparsify / SAELens were not installed here (no `.venv-peers`), so their TopK / "
                     "BatchTopK reference rows are missing.")
    lines.append("- **Downstream quality** (loss recovered, interpretability) is not measured by this study.")
    return lines


def _relative(results: Path) -> str:
    try:
        return str(results.resolve().relative_to(_common.README.parent))
    except ValueError:
        return str(results)


def report(results: Path, readme: Optional[Path]) -> str:
    """Figures into ``results``, the section (returned) into ``readme`` between the study markers."""
    grid, sweep = load(results, "grid"), load(results, "ksweep")
    if grid is not None and grid["runs"]:
        s = grid["setting"]
        dead_figure(cells(grid), results / DEAD_FIGURE,
                    f"MiniLM layer 3, k = {s['k']}, F = {s['n_features']}, {s['steps'] * s['batch_size']:,} tokens, "
                    f"dead window {s['dead_tokens']:,} tokens; mean ± std over seeds {grid['seeds']}")
    if sweep is not None and sweep["runs"]:
        s = sweep["setting"]
        title = (f"MiniLM layer 3, F = {s['n_features']}, {s['steps'] * s['batch_size']:,} tokens, aux_k_loss; "
                 f"mean ± std over seeds {sweep['seeds']}")
        pareto_figure(cells(sweep), s["ks"], results / PARETO_FIGURE, title)
    section = render(results)
    if readme is not None and not _common.write_marked_section(section, START, END, readme):
        raise SystemExit(f"{readme} has no {START} ... {END} markers; add them under a '## Does it work?' heading")
    return section
