"""The study (benchmarks/study.py, `make study`): its --quick run writes every part's results with the full
schema, reuses finished runs, and renders the README's "Does it work?" section from them."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402
import study_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"fvu", "l0", "l0_std", "l0_p5", "l0_p95", "dead_fraction", "under_used_fraction"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick study into a temporary directory, with a copy of the README to update."""
    out = tmp_path_factory.mktemp("study")
    readme = out / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert study.main(["--quick", "--out-dir", str(out), "--readme", str(readme)]) == 0
    return out, readme


def test_quick_study_writes_every_run_of_every_part_with_its_metrics(quick):
    out, _ = quick
    rules = len(study.RULES)  # every rule: TopK, FC, FC Zipf, FC Zipf with a capacity floor, MC
    for part, count in (("grid", 3 * rules), ("ksweep", 2 * rules), ("synthetic", 3 * rules), ("confirm", 2 * rules)):
        payload = json.loads((out / f"study_{part}_cpu.json").read_text())
        assert payload["complete"] and payload["part"] == part and len(payload["runs"]) == count
        assert len({run["key"] for run in payload["runs"]}) == count
        for run in payload["runs"]:
            assert {"rule", "aux", "k", "seed", "seconds", "training", "as_trained", "calibrated"} <= set(run)
            assert run["seconds"] > 0
            assert METRIC_KEYS <= set(run["as_trained"])
            assert {"fvu", "l0", "dead_fraction", "under_used_fraction"} <= set(run["training"])
            assert (run["calibrated"] is None) == (run["rule"] == "topk")  # TopK has no thresholds
            if run["calibrated"] is not None:
                assert METRIC_KEYS <= set(run["calibrated"])
            assert ("feature_recovery" in run) == (part == "synthetic")
            assert 0 <= run["as_trained"]["dead_fraction"] <= 1
    sweep = json.loads((out / "study_ksweep_cpu.json").read_text())
    assert {run["k"] for run in sweep["runs"]} == set(study.QUICK["ksweep"].ks)
    peers = json.loads((out / "study_peers_cpu.json").read_text())
    assert peers["complete"] and ("skipped" in peers or peers["runs"])


def test_a_rerun_of_the_same_setting_reuses_its_runs_and_new_aux_zipf_options_rerun_only_those(quick, tmp_path):
    out, _ = quick
    path = tmp_path / "study_grid_cpu.json"
    shutil.copy(out / "study_grid_cpu.json", path)
    before = json.loads(path.read_text())["runs"]
    args = study.parse_args(["--quick", "--parts", "grid", "--rules", "topk", "--aux", "none,zipf",
                             "--aux-zipf-options", '{"zipf_s": 0.5}',
                             "--out-dir", str(tmp_path)])
    payload = study.run_part("grid", args.settings["grid"], args.seeds, path, args, log=lambda _: None)
    keys = [run["key"] for run in payload["runs"]]
    assert keys[: len(before)] == [run["key"] for run in before]  # every earlier run kept, none retrained
    assert len(keys) == len(before) + 1 and len(set(keys)) == len(keys)
    new = payload["runs"][-1]
    assert (new["rule"], new["aux"], new["aux_config"]["zipf_s"]) == ("topk", "zipf", 0.5)
    table = study_report.cells(payload)  # the earlier aux_zipf cell stays, tagged with how it differs
    assert ("topk", "zipf", 4, "") in table and ("topk", "zipf", 4, "zipf_s=1.0") in table


def test_the_readme_section_is_rendered_between_the_markers_with_a_verdict_per_claim(quick):
    out, readme = quick
    text = readme.read_text()
    section = text.split(study_report.START, 1)[1].split(study_report.END, 1)[0]
    for claim in ("Claim 1", "Claim 2", "Claim 3"):
        line = next(line for line in section.splitlines() if line.startswith(f"**{claim}"))
        assert any(word in line for word in ("**holds**", "**does not hold**", "**holds only for**"))
    assert "### What this study could not settle" in section and "| TopK + aux_k |" in section
    assert (out / study_report.PARETO_FIGURE).stat().st_size > 0 and (out / study_report.DEAD_FIGURE).exists()
    original = (ROOT / "README.md").read_text()
    for marker, side in ((study_report.START, 0), (study_report.END, 1)):  # nothing outside the markers changed
        assert text.split(marker, 1)[side] == original.split(marker, 1)[side]


def test_verdicts_follow_the_numbers():
    lower, higher = {"mean": 0.1, "std": 0.01}, {"mean": 0.2, "std": 0.01}
    assert study_report.compare(lower, higher) == "lower" and study_report.compare(higher, lower) == "higher"
    assert study_report.compare(lower, {"mean": 0.115, "std": 0.01}) == "same"  # within the seeds' spread
    assert study_report.verdict([("a", "lower"), ("b", "lower")]).startswith("**holds**")
    assert study_report.verdict([("a", "lower"), ("b", "same")]).startswith("**holds only for** a")
    assert study_report.verdict([("a", "higher"), ("b", "same")]).startswith("**does not hold**")


def test_an_unknown_trainconfig_option_is_refused_by_name():
    with pytest.raises(SystemExit, match="no_such_field"):
        study.train_config(study.QUICK["grid"], "topk", "zipf", 4, 0, {"no_such_field": 1})


def test_the_peers_part_runs_the_peer_protocol_and_renders_reference_rows(tmp_path):
    """Here with allocation's own adapters (the peers themselves are not installed under make test)."""
    args = study.parse_args(["--quick", "--parts", "peers", "--peer-systems", "allocation-topk,allocation-mc",
                             "--out-dir", str(tmp_path)])
    payload = study.run_peers(args.settings["peers"], args.seeds, tmp_path / "study_peers_cpu.json", args)
    assert payload["complete"] and set(payload["runs"][0]["systems"]) == {"allocation-topk", "allocation-mc"}
    lines = study_report.peers_lines(json.loads((tmp_path / "study_peers_cpu.json").read_text()))
    assert any(line.startswith("| allocation-mc |") for line in lines)


def test_under_used_means_below_a_tenth_of_the_uniform_share():
    import torch

    from allocation.sae.metrics import under_used_fraction

    # F = 4 features sharing L0 = 0.04 per token: uniform share 0.01, under-used below 0.001
    frequency = torch.tensor([0.0, 0.0009, 0.002, 0.5])
    assert under_used_fraction(frequency, 0.04) == 0.5


def test_topk_fvu_is_read_off_its_curve_linearly_in_log_l0():
    table = {("topk", "k", 8, ""): {"fvu": {"mean": 0.4}}, ("topk", "k", 32, ""): {"fvu": {"mean": 0.2}}}
    assert study_report.topk_fvu_at(table, (8, 32), 16.0) == pytest.approx(0.3)  # halfway in log2: 3 of 3..5
    assert study_report.topk_fvu_at(table, (8, 32), 64.0) is None  # outside the sweep: no extrapolation
