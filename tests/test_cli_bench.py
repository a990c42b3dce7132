"""``allocation bench`` and ``allocation.timing``: the timing harness behind the benchmarks."""

import json

import pytest
import torch

from allocation import cli, timing


def test_bench_prints_every_method_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = cli.main(["bench", "--size", "64x256", "--k", "8", "--repeats", "2", "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    for label in ("per-row torch.topk", "allocation.mutual_choice", "allocation.feature_choice",
                  "Zipf m", "flatten().topk(B)", "topk(m, dim=0)", "naive Zipf FC", "bandwidth floor"):
        assert label in out
    result = json.loads(path.read_text())
    assert (result["n_tokens"], result["n_features"], result["k"]) == (64, 256, 8)
    assert (result["budget"], result["per_feature"]) == (64 * 8, 2)
    assert all(len(result["runs"][name]) == 2 for name in ("row_topk", "mutual_choice", "feature_choice"))
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert result["ratios"]["naive_mc_vs_mc"] > 0 and result["floor_seconds"] > 0


def test_bench_can_skip_the_naive_baselines(capsys):
    assert cli.main(["bench", "--size", "16x32", "--k", "4", "--repeats", "1", "--naive-repeats", "0",
                     "--dtype", "bfloat16", "--no-zipf"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "naive MC" not in out and "Zipf" not in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--size", "64"], "--size must look like 4096x32768"),
        (["--size", "0x8"], "--size must look like"),
        (["--size", "8x8", "--k", "9"], "--k must be in [1, n_features=8]"),
        (["--size", "8x8", "--k", "2", "--repeats", "0"], "--repeats must be >= 1"),
        (["--size", "8x8", "--k", "2", "--device", "nonsense"], "is not a torch device"),
        (["--size", "8x8", "--k", "2", "--threads", "0"], "--threads must be >= 1"),
        (["--size", "8x8", "--k", "2", "--zipf-exponent", "-1"], "--zipf-exponent must be >= 0"),
    ],
)
def test_bench_rejects_bad_arguments_by_name(arguments, message, capsys):
    assert cli.main(["bench", *arguments]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_on_missing_cuda_says_so(capsys):
    assert cli.main(["bench", "--size", "8x8", "--k", "2", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_time_kernels_refuses_to_time_a_wrong_rule(monkeypatch):
    """The naive baselines double as a check: a rule that selects other values is not timed."""
    monkeypatch.setattr(timing.rules, "mutual_choice", lambda scores, total: scores > 10.0)
    with pytest.raises(AssertionError, match="disagree"):
        timing.time_kernels(32, 64, 4, repeats=1, naive_repeats=1)


def test_zipf_capacities_sum_to_about_k_n_within_one_to_n():
    capacities = timing.zipf_capacities(512, 2048, 16, 1.0)
    assert int(capacities.min()) >= 1 and int(capacities.max()) <= 512
    assert torch.all(capacities[:-1] >= capacities[1:])
    assert abs(int(capacities.sum()) - 16 * 512) <= 0.5 * 16 * 512


def test_interleaved_runs_alternate_the_methods():
    order = []
    runs = timing.interleaved_runs({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                   torch.device("cpu"), repeats=2, warmup=1)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert [len(v) for v in runs.values()] == [2, 2]
