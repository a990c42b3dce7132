"""benchmarks/aux_variants.py: the quick grid runs, its results file aggregates per variant, the report renders."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import aux_variants  # noqa: E402


def test_quick_grid_writes_runs_rows_and_a_default(tmp_path, capsys):
    out = tmp_path / "aux.json"
    assert aux_variants.main(["--quick", "--seeds", "0,1", "--variants", "aux_k,zipf_relative", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["setting"] == aux_variants.QUICK
    assert sorted((r["variant"], r["seed"]) for r in payload["runs"]) == [
        ("aux_k", 0), ("aux_k", 1), ("zipf_relative", 0), ("zipf_relative", 1)]
    rows = {row["variant"]: row for row in payload["rows"]}
    for row in rows.values():
        assert row["seeds"] == [0, 1] and row["eval_l0"]["mean"] == 4.0  # TopK: L0 = k
        assert 0 <= row["dead_fraction"]["mean"] <= 1 and row["eval_fvu"]["std"] >= 0
    assert payload["default"]["variant"] == "zipf_relative"  # the only aux_zipf variant run
    text = aux_variants.render(payload)
    assert "| topk | zipf_relative |" in text and "**zipf_relative**" in text
    # a second call trains nothing new: the runs in the file are kept
    assert aux_variants.main(["--quick", "--seeds", "0", "--variants", "aux_k", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["runs"]) == 4


def test_choose_default_prefers_fewer_dead_and_under_used_at_no_fvu_cost():
    def row(variant, dead, under, fvu, fvu_std=0.001):
        return {"rule": "topk", "variant": variant, "options": aux_variants.VARIANTS[variant],
                "dead_fraction": {"mean": dead, "std": 0},
                "under_used_fraction": {"mean": under, "std": 0}, "eval_fvu": {"mean": fvu, "std": fvu_std}}

    rows = [row("aux_k", 0.03, 0.15, 0.170), row("zipf_absolute", 0.03, 0.14, 0.170),
            row("zipf_relative", 0.0, 0.05, 0.180),  # fewest dead, but costs FVU
            row("zipf_log_ratio", 0.01, 0.08, 0.1705)]
    choice = aux_variants.choose_default(rows)
    assert choice["variant"] == "zipf_log_ratio" and choice["beats_aux_k"]
    assert choice["options"] == aux_variants.VARIANTS["zipf_log_ratio"]
