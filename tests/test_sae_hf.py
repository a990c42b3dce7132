"""Activations from a local Hugging Face model: tiny random GPT-2 / BERT built from configs (no downloads)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from allocation.errors import AllocationError
from allocation.sae import load_activations

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the `real` extra (transformers) is not installed"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hf_tiny import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


def reference_windows(hf, corpus, n_tokens, max_length, keep=False):
    from allocation.sae.hf import iter_documents, iter_windows, special_tokens

    prefix, suffix = special_tokens(hf.tokenizer)
    return list(iter_windows(iter_documents(corpus), hf.tokenizer, n_tokens, max_length, keep, prefix, suffix))


def hidden_states(hf, windows, layer):
    with torch.no_grad():
        return np.concatenate(
            [
                hf.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, a:b].numpy()
                for ids, a, b in windows
            ]
        )


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_resid_post_is_output_hidden_states_and_tokens_are_recorded(tiny, tmp_path, name):
    from allocation.sae.hf import load_hf_model, read_tokens

    hf = load_hf_model(tiny[name])
    windows = reference_windows(hf, tiny["corpus"], 120, 16)
    for layer in range(hf.n_layers + (0 if name == "gpt2" else 1)):  # GPT-2's last entry is after ln_f
        source = load_activations(
            "hf",
            model=tiny[name],
            layer=layer,
            text=tiny["corpus"],
            n_tokens=120,
            max_length=16,
            cache_dir=tmp_path,
            batch_size=3,
        )
        assert source.array.shape == (120, 32) and source.d_in == 32
        np.testing.assert_allclose(np.asarray(source.array), hidden_states(hf, windows, layer), atol=1e-5)
    tokens = read_tokens(source.metadata["cache_path"])
    expected_ids = np.concatenate([ids[a:b] for ids, a, b in windows])
    expected_window = np.concatenate([[w] * (b - a) for w, (_, a, b) in enumerate(windows)])
    np.testing.assert_array_equal(tokens[:, 0], expected_ids)
    np.testing.assert_array_equal(tokens[:, 1], expected_window)
    assert source.metadata["model_kind"] == ("causal-lm" if name == "gpt2" else "encoder")
    if name == "bert":  # [CLS]/[SEP] are not rows
        assert source.metadata["special_prefix"] == [hf.tokenizer.cls_token_id]
        assert not np.isin(tokens[:, 0], [hf.tokenizer.cls_token_id, hf.tokenizer.sep_token_id]).any()
    if name == "gpt2":  # the last block's output, before the final norm
        last = load_activations(
            "hf",
            model=tiny[name],
            layer=hf.n_layers,
            text=tiny["corpus"],
            n_tokens=120,
            max_length=16,
            cache_dir=tmp_path,
        )
        with torch.no_grad():
            normed = hf.model.transformer.ln_f(torch.tensor(np.asarray(last.array))).numpy()
        np.testing.assert_allclose(normed, hidden_states(hf, windows, hf.n_layers), atol=1e-4)


def test_gpt2_attn_and_mlp_outputs_add_up_to_the_residual_stream(tiny, tmp_path):
    options = dict(model=tiny["gpt2"], text=tiny["corpus"], n_tokens=80, max_length=12, cache_dir=tmp_path)
    for layer in (1, 2, 3):
        before = np.asarray(load_activations("hf", layer=layer - 1, **options).array)
        attn = np.asarray(load_activations("hf", layer=layer, site="attn_out", **options).array)
        mlp = np.asarray(load_activations("hf", layer=layer, site="mlp_out", **options).array)
        after = np.asarray(load_activations("hf", layer=layer, **options).array)
        np.testing.assert_allclose(before + attn + mlp, after, atol=1e-5)
        assert np.abs(attn).max() > 1e-3 and np.abs(mlp).max() > 1e-3


def test_bert_sites_hook_the_projections_before_the_residual_add(tiny, tmp_path):
    from allocation.sae.hf import load_hf_model

    hf = load_hf_model(tiny["bert"])
    source = load_activations(
        "hf",
        model=tiny["bert"],
        layer=2,
        site="mlp_out",
        text=tiny["corpus"],
        n_tokens=50,
        max_length=12,
        cache_dir=tmp_path,
    )
    assert source.metadata["hook"] == "encoder.layer.1.output.dense (output)"
    windows = reference_windows(hf, tiny["corpus"], 50, 12)
    block = hf.model.encoder.layer[1]
    with torch.no_grad():
        rows = []
        for ids, a, b in windows:
            h = hf.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
            attention = block.attention(h)[0] if isinstance(block.attention(h), tuple) else block.attention(h)
            rows.append(block.output.dense(block.intermediate(attention))[0, a:b].numpy())
    np.testing.assert_allclose(np.asarray(source.array), np.concatenate(rows), atol=1e-5)


def test_cache_is_reused_and_keyed_by_every_input(tiny, tmp_path, monkeypatch):
    from hf_tiny import save_tiny_gpt2

    from allocation.sae import hf

    options = dict(model=tiny["gpt2"], layer=1, text=tiny["corpus"], n_tokens=60, max_length=16, cache_dir=tmp_path)
    first = load_activations("hf", **options)
    sidecar = json.loads((tmp_path / (first.metadata["cache_path"].rsplit("/", 1)[1] + ".json")).read_text())
    assert sidecar["site"] == "resid_post" and sidecar["layer"] == 1 and sidecar["tokens_per_second"] > 0

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again instead of reusing the cache")

    monkeypatch.setattr(hf, "extract", no_extraction)
    again = load_activations("hf", **options)
    assert again.metadata["cache_path"] == first.metadata["cache_path"]
    with pytest.raises(AssertionError, match="extracted again"):
        load_activations("hf", **options, rebuild=True)
    monkeypatch.undo()

    keys = {first.metadata["cache_key"]}
    changed = tiny["root"] / "corpus-changed.txt"
    changed.write_text(tiny["corpus"].read_text().replace("cat", "dog", 1))
    variants = [
        dict(options, text=changed),
        dict(options, layer=2),
        dict(options, site="mlp_out"),
        dict(options, max_length=12),
        dict(options, n_tokens=61),
        dict(options, model=save_tiny_gpt2(tiny["root"] / "gpt2-other-weights", seed=1)),
    ]
    for variant in variants:
        keys.add(load_activations("hf", **variant).metadata["cache_key"])
    assert len(keys) == len(variants) + 1
    # editing the corpus in place invalidates its cache too
    edited = tiny["root"] / "edited.txt"
    edited.write_text(tiny["corpus"].read_text())
    before = load_activations("hf", **dict(options, text=edited))
    edited.write_text(tiny["corpus"].read_text().replace("mat", "park"))
    after = load_activations("hf", **dict(options, text=edited))
    assert before.metadata["cache_key"] != after.metadata["cache_key"]


def test_a_cache_hit_loads_no_model_when_layer_and_max_length_are_given(tiny, tmp_path, monkeypatch):
    """Regression: every cached load used to load the model first (8-17 s for MiniLM) only to key the cache."""
    from allocation.sae import hf

    options = dict(model=tiny["gpt2"], layer=1, text=tiny["corpus"], n_tokens=60, max_length=16, cache_dir=tmp_path)
    first = load_activations("hf", **options)

    def no_model(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(hf, "load_hf_model", no_model)
    again = load_activations("hf", **options)
    assert again.metadata["cache_key"] == first.metadata["cache_key"]
    np.testing.assert_array_equal(np.asarray(again.array), np.asarray(first.array))
    for needs_the_model in (dict(options, layer=None), dict(options, max_length=None), dict(options, rebuild=True),
                            dict(options, layer=2)):  # defaults come from the model; a miss extracts
        with pytest.raises(AssertionError, match="loaded the model"):
            load_activations("hf", **needs_the_model)
    with pytest.raises(AllocationError, match="device must be a torch device"):
        load_activations("hf", **options, device="gpu0")


def test_jsonl_directory_and_list_corpora(tiny, tmp_path):
    from hf_tiny import corpus_lines

    docs = corpus_lines()
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    options = dict(model=tiny["gpt2"], layer=1, n_tokens=90, max_length=16, cache_dir=tmp_path / "cache")
    from_txt = np.asarray(load_activations("hf", text=tiny["corpus"], **options).array)
    from_jsonl = np.asarray(load_activations("hf", text=jsonl, text_field="body", **options).array)
    from_list = np.asarray(load_activations("hf", text=docs, **options).array)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(docs[:10]))
    (folder / "b.txt").write_text("\n\n".join(docs[10:]))
    from_dir = np.asarray(load_activations("hf", text=folder, **options).array)
    for other in (from_jsonl, from_list, from_dir):
        np.testing.assert_allclose(other, from_txt, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_datasets_save_to_disk_corpus(tiny, tmp_path):
    import datasets
    from hf_tiny import corpus_lines

    datasets.Dataset.from_dict({"text": corpus_lines()}).save_to_disk(str(tmp_path / "ds"))
    options = dict(model=tiny["gpt2"], layer=1, n_tokens=90, max_length=16, cache_dir=tmp_path / "cache")
    from_ds = np.asarray(load_activations("hf", text=tmp_path / "ds", **options).array)
    from_txt = np.asarray(load_activations("hf", text=tiny["corpus"], **options).array)
    np.testing.assert_allclose(from_ds, from_txt, atol=1e-5)


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    cache = tmp_path / "cache"
    base = dict(model=tiny["gpt2"], layer=1, text=tiny["corpus"], n_tokens=50, cache_dir=cache)
    with pytest.raises(AllocationError, match="not a local directory: models load with local_files_only=True"):
        load_activations("hf", **dict(base, model=tmp_path / "missing"))
    with pytest.raises(AllocationError, match="local_files_only"):
        load_activations("hf", **dict(base, model="gpt2"))  # a hub name is not a directory
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(AllocationError, match="has no config.json"):
        load_activations("hf", **dict(base, model=tmp_path / "empty-model"))
    with pytest.raises(AllocationError, match="layer 4 does not exist for site resid_post of this 3-block model"):
        load_activations("hf", **dict(base, layer=4))
    with pytest.raises(AllocationError, match="layer 0 does not exist for site attn_out.*from 1 to 3"):
        load_activations("hf", **dict(base, layer=0, site="attn_out"))
    with pytest.raises(AllocationError, match="site must be one of resid_post, attn_out, mlp_out"):
        load_activations("hf", **dict(base, site="resid_pre"))
    with pytest.raises(AllocationError, match=r"options \['modle'\] do not apply to the hf source; allowed: \['model'"):
        load_activations("hf", modle=tiny["gpt2"], text=tiny["corpus"])
    with pytest.raises(AllocationError, match="needs model=PATH"):
        load_activations("hf", text=tiny["corpus"])
    with pytest.raises(AllocationError, match="needs text=FILE_OR_DIR"):
        load_activations("hf", model=tiny["gpt2"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(AllocationError, match="is empty: it holds no text"):
        load_activations("hf", **dict(base, text=empty))
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AllocationError, match="is not a text file: it holds NUL bytes"):
        load_activations("hf", **dict(base, text=binary))
    binary.write_bytes(b"the cat \xff\xfe sat\n")
    with pytest.raises(AllocationError, match="is not UTF-8 text"):
        load_activations("hf", **dict(base, text=binary))
    array_file = tmp_path / "acts.npy"
    np.save(array_file, np.zeros((3, 3)))
    with pytest.raises(AllocationError, match="is not a text corpus"):
        load_activations("hf", **dict(base, text=array_file))
    with pytest.raises(AllocationError, match="does not exist; pass text=FILE_OR_DIR"):
        load_activations("hf", **dict(base, text=tmp_path / "nope.txt"))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"content": "the cat"}\n')
    with pytest.raises(AllocationError, match="has no string field 'text'; pass text_field=NAME"):
        load_activations("hf", **dict(base, text=bad_jsonl))
    with pytest.raises(AllocationError, match=r"n_tokens=100000 is more than the \d+ tokens the corpus"):
        load_activations("hf", **dict(base, n_tokens=100_000))
    with pytest.raises(AllocationError, match="max_length must be between 1 and the model's 64 positions"):
        load_activations("hf", **dict(base, max_length=65))
    with pytest.raises(AllocationError, match="dtype must be one of"):
        load_activations("hf", **dict(base, dtype="int8"))
    assert not cache.exists() or not any(cache.iterdir())  # no failed run left a cache file behind


def test_streaming_buffers_give_the_same_rows(tiny, tmp_path):
    """Extraction in buffers of 3 windows and batches of 2 writes exactly the rows of one big buffer."""
    import numpy as np

    from allocation.sae import hf

    source = load_activations(
        "hf", model=tiny["gpt2"], layer=2, text=tiny["corpus"], n_tokens=150, max_length=10, cache_dir=tmp_path
    )
    model = hf.load_hf_model(tiny["gpt2"])
    prefix, suffix = hf.special_tokens(model.tokenizer)
    windows = hf.iter_windows(
        hf.iter_documents(hf.check_corpus(tiny["corpus"])), model.tokenizer, 150, 10, False, prefix, suffix
    )
    out = np.zeros((150, 32), dtype=np.float32)
    tokens = np.zeros((150, 2), dtype=np.int32)
    assert hf.extract(model, 2, "resid_post", windows, out, tokens, batch_size=2, buffer_windows=3) == 150
    np.testing.assert_allclose(out, np.asarray(source.array), atol=1e-5)
    np.testing.assert_array_equal(tokens, hf.read_tokens(source.metadata["cache_path"]))
