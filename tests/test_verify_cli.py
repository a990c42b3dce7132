"""`allocation verify module:function`: exit 0 when verified, 1 with a counterexample, 2 on bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from allocation.cli import main

RULES = textwrap.dedent(
    '''
    import torch
    import allocation

    def greedy(scores):
        """Largest entries first while row and column have room: not optimal for caps 1 and 1."""
        n_tokens, n_features = scores.shape
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for index in torch.argsort(scores.flatten(), descending=True, stable=True).tolist():
            i, j = divmod(index, n_features)
            if scores[i, j] > 0 and not mask[i].any() and not mask[:, j].any():
                mask[i, j] = True
        return mask

    def top2(scores):
        return allocation.topk(scores, 2)
    '''
)


@pytest.fixture
def rules_module(tmp_path, monkeypatch):
    """A module with two rules in a fresh current directory, under a name unique to the test."""
    name = f"user_rules_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield name
    sys.modules.pop(name, None)


def test_verified_rule_exits_0(rules_module, capsys):
    assert main(["verify", f"{rules_module}:top2", "--per-token", "2", "--examples", "40",
                 "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED" in out and "Constraints(per_token=2)" in out


def test_refuted_rule_exits_1_and_prints_the_counterexample(rules_module, capsys):
    code = main(["verify", f"{rules_module}:top2", "--per-token", "1", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "REFUTED" in out and "per_token cap exceeded at token 0 (2 > 1)" in out
    assert "scores as a literal: [[1, 1]]" in out


def test_a_file_path_works_too(rules_module, capsys):
    assert main(["verify", f"{rules_module}.py:top2", "--total", "3", "--examples", "20"]) == 1
    assert "failed check:      optimality" in capsys.readouterr().out  # 2 per row leaves budget unused


def test_bad_rule_specs_exit_2(rules_module, capsys):
    assert main(["verify", "no_such_module_xyz:rule", "--per-token", "1"]) == 2
    assert main(["verify", f"{rules_module}:missing", "--per-token", "1"]) == 2
    assert main(["verify", "just_a_name", "--per-token", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot import 'no_such_module_xyz'" in err and "has no attribute 'missing'" in err
    assert "module:function" in err


def test_python_dash_m_entry_point(rules_module, tmp_path):
    """The module is found in the current directory and the exit code comes through the process."""
    refute = [sys.executable, "-m", "allocation", "verify", f"{rules_module}:top2", "--per-feature", "1"]
    result = subprocess.run(refute, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    # which of the two smallest counterexamples the subprocess's search ends on changed with unrelated
    # edits to allocation/sae/train.py (deterministic per code version): accept either
    assert "REFUTED" in result.stdout
    assert any(f"scores as a literal: {literal}\n" in result.stdout for literal in ("[[1, 1, 1]]", "[[1], [1]]"))
