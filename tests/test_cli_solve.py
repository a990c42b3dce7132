"""`allocation solve`: exact optimum, prices and the torch rule's objective, from files or --random."""

import subprocess
import sys

import numpy as np
import pytest

from allocation.cli import main


def test_random_topk_prints_objective_prices_and_zero_gap(capsys):
    assert main(["solve", "--random", "8x16", "--seed", "0", "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert "selected 16 entries" in out and "token prices" in out
    assert "gap to exact 0" in out
    assert "mask (# selected" in out


def test_npy_and_csv_with_combined_caps(tmp_path, capsys):
    scores = np.array([[10.0, 9.0], [9.0, 0.0]])
    np.save(tmp_path / "s.npy", scores)
    np.savetxt(tmp_path / "s.csv", scores, delimiter=",")
    for name in ("s.npy", "s.csv"):
        assert main(["solve", str(tmp_path / name), "--topk", "1", "--feature-choice", "1"]) == 0
        out = capsys.readouterr().out
        assert "objective 18.000000" in out and "feature prices" in out


def test_mutual_choice_reports_budget_price(capsys):
    assert main(["solve", "--random", "4x5", "--mutual-choice", "3", "--backend", "cvxpy"]) == 0
    out = capsys.readouterr().out
    assert "budget price" in out and "selected 3 entries" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["solve", "missing.npy", "--topk", "1"], "does not exist"),
        (["solve", "--random", "8by16", "--topk", "1"], "--random must look like 8x16"),
        (["solve", "--random", "2x2"], "give at least one of"),
        (["solve", "--random", "2x2", "--topk", "-1"], "per_token must be >= 0"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_installed_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "allocation", "solve", "--random", "3x4", "--topk", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "torch rule: objective" in result.stdout


def test_issue11_a_matrix_that_cannot_fit_is_refused_naming_the_memory(capsys):
    """Issue 11.5: --random 100000x100000 died with numpy's _ArrayMemoryError (74.5 GiB)."""
    assert main(["solve", "--random", "100000x100000", "--topk", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB" in err and "available" in err


def test_issue11_a_directory_is_named_as_such(tmp_path, capsys):
    """Issue 11.10: `allocation solve DIR` said the file 'does not exist'."""
    assert main(["solve", str(tmp_path), "--topk", "1"]) == 2
    assert "is a directory" in capsys.readouterr().err
