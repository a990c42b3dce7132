"""allocation inspect: top-activating tokens, frequencies, density; text, HTML, and HTML in headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from allocation.errors import AllocationError
from allocation.sae import TrainConfig, Trainer

CHROMIUM = Path("/usr/bin/chromium")
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the `real` extra (transformers) is not installed"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("the `real` extra (transformers) is not installed")
    from hf_tiny import corpus_lines, save_tiny_gpt2

    root = tmp_path_factory.mktemp("inspect")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_lines(60)) + "\n")
    model = save_tiny_gpt2(root / "gpt2")
    options = dict(model=str(model), text=str(corpus), layer=2, n_tokens=500, cache_dir=str(root / "cache"))
    config = TrainConfig(k=4, n_features=48, tokens=1024, batch_size=128, data_options=options, downstream=False)
    trainer = Trainer(config, "hf", out=root / "run")
    trainer.run()
    return {"dir": root / "run", "trainer": trainer, "root": root}


@needs_transformers
def test_top_examples_frequencies_and_context_match_a_brute_force_pass(run):
    from allocation.sae.hf import read_tokens
    from allocation.sae.inspect import inspect_features

    trainer = run["trainer"]
    rows = np.asarray(trainer.source.array)
    sae = trainer.sae.eval()
    with torch.no_grad():
        code = sae.encode(torch.tensor(rows)).numpy()
    fired = (code > 0).sum(0)
    features = [int(f) for f in np.argsort(-fired)[:3]] + [int(np.argmin(fired))]
    report = inspect_features(run["dir"], features=features, top=5, context=3)
    assert report.n_tokens == 500 and report.n_features == 48 and [f.index for f in report.features] == features
    np.testing.assert_allclose(report.frequency, fired / 500)
    assert sum(report.density["counts"]) + report.density["never"] == 48
    tokens = read_tokens(trainer.source.metadata["cache_path"])
    tokenizer = (
        __import__("allocation.sae.hf", fromlist=["x"]).load_hf_model(trainer.source.metadata["model_path"]).tokenizer
    )
    for feature in report.features:
        column = code[:, feature.index]
        expected = np.sort(column[column > 0])[::-1][:5]
        np.testing.assert_allclose([e.value for e in feature.examples], expected, rtol=1e-5)
        assert feature.fired == fired[feature.index]
        for example in feature.examples:
            assert column[example.row] == pytest.approx(example.value, rel=1e-5)
            word = tokenizer.convert_ids_to_tokens(int(tokens[example.row, 0]))
            assert example.token.strip() == word
            assert len(example.left.split()) <= 3 and len(example.right.split()) <= 3
    random_report = inspect_features(run["dir"], n_random=3, top=2, seed=1)
    chosen = [f.index for f in random_report.features]
    assert len(set(chosen)) == 3 and all(fired[i] > 0 for i in chosen)
    with pytest.raises(AllocationError, match=r"features \[48\] do not exist: this SAE has features 0 to 47"):
        inspect_features(run["dir"], features=[48])
    with pytest.raises(AllocationError, match="is not a run directory"):
        inspect_features(run["root"])


@needs_transformers
def test_text_and_html_views(run):
    from allocation.sae.inspect import format_report, inspect_features, render_html

    report = inspect_features(run["dir"], features=[0, 5, 7], top=3, context=2)
    text = format_report(report)
    assert "feature density" in text and "never" in text
    for index in (0, 5, 7):
        assert f"feature {index}: fires on" in text
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.count('<section class="feature"') == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert not re.search(r"\bsrc=", page)


def test_inspect_a_synthetic_run_shows_rows(tmp_path):
    from allocation.sae.inspect import format_report, inspect_features

    Trainer(TrainConfig(k=4, n_features=32, tokens=512, batch_size=128), "synthetic", out=tmp_path / "run").run()
    report = inspect_features(tmp_path / "run", n_random=2, top=3, max_tokens=2000)
    assert report.n_tokens == 2000 and len(report.features) == 2
    assert all(e.token.startswith("row ") for f in report.features for e in f.examples)
    assert "feature" in format_report(report)


@needs_transformers
def test_cli_inspect_prints_and_writes_html(run, tmp_path, capsys):
    from allocation.cli import main

    html_path = tmp_path / "report" / "features.html"
    assert main(["inspect", str(run["dir"]), "--features", "1,2", "--top", "3", "--html", str(html_path)]) == 0
    out = capsys.readouterr().out
    assert "feature 1: fires on" in out and "feature 2: fires on" in out and str(html_path) in out
    assert html_path.read_text().count('<section class="feature"') == 2
    assert main(["inspect", str(run["dir"]), "--features", "a,b"]) == 2
    assert "--features expects comma-separated integers" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2


@needs_transformers
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (/usr/bin/chromium) is not installed")
def test_html_report_renders_in_headless_chromium(run, tmp_path):
    from allocation.sae.inspect import inspect_features, render_html

    features = [3, 9, 11]
    page = tmp_path / "features.html"
    page.write_text(render_html(inspect_features(run["dir"], features=features, top=4)), encoding="utf-8")
    completed = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    dom = completed.stdout
    sections = re.findall(r'<section class="feature" id="feature-(\d+)"', dom)
    assert [int(s) for s in sections] == features
    for index in features:
        assert f"<h2>Feature {index}</h2>" in dom
    assert dom.count('<tr class="example">') >= len(features)
    from allocation.sae.metrics import DENSITY_BINS

    assert len(re.findall(r'<rect class="bin"', dom)) == len(DENSITY_BINS)  # 'never' + one per pair of edges
    assert "<mark" in dom
