"""Synthetic ground truth: sparse superposition of known unit features with Zipf frequencies.

A token is ``x = sum_j c_j f_j + noise`` over the true features ``f_j`` (unit rows of
``true_features``), with ``c_j > 0`` for the active features and 0 otherwise. Feature ``j`` (rank
``j + 1``) has base frequency ``p_j = min(max_frequency, c / (j + 1)^s)``, with ``c`` set so that
``sum_j p_j = mean_active``. Each token draws a difficulty ``d ~ Gamma(shape, scale=1/shape)``
(mean 1) and activates feature ``j`` independently with probability ``min(1, d * p_j)``: the number of
active features varies from token to token (some tokens are harder), while the expected frequency of
every unsaturated feature stays ``p_j`` (a Zipf law). Magnitudes are uniform on
``magnitude_range``; the noise is isotropic Gaussian with standard deviation ``noise_std`` per
dimension.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .._validate import positive_int
from ..errors import AllocationError
from ..zipf import water_fill, zipf_weights
from .sources import ActivationSource, check_batch_args, tensor_to_numpy

_FEATURE_STREAM = 0
_TOKEN_STREAM = 1


class SyntheticSource(ActivationSource):
    """Endless synthetic activations with known features; ``seed`` fixes the features, ``batches``'
    seed fixes the tokens. ``split="heldout"`` is an independent token stream over the same features."""

    def __init__(
        self,
        d_in: int,
        n_true_features: int,
        *,
        mean_active: float = 8.0,
        zipf_exponent: float = 1.0,
        max_frequency: float = 0.5,
        difficulty_shape: Optional[float] = 8.0,
        magnitude_range: tuple[float, float] = (0.5, 1.5),
        noise_std: float = 0.01,
        seed: int = 0,
    ):
        self.d_in = positive_int(d_in, "d_in", allow_integral_float=False)
        self.n_true_features = positive_int(n_true_features, "n_true_features", allow_integral_float=False)
        self.mean_active = _check_number(mean_active, "mean_active", low=0.0, low_open=True)
        self.zipf_exponent = _check_number(zipf_exponent, "zipf_exponent", low=0.0)
        self.max_frequency = _check_number(max_frequency, "max_frequency", low=0.0, low_open=True, high=1.0)
        if self.mean_active >= self.max_frequency * self.n_true_features:
            raise AllocationError(
                f"mean_active={mean_active} is not below max_frequency * n_true_features = "
                f"{self.max_frequency * self.n_true_features:g}; lower mean_active or add true features"
            )
        self.difficulty_shape = (
            None
            if difficulty_shape is None
            else _check_number(difficulty_shape, "difficulty_shape", low=0.0, low_open=True)
        )
        low, high = _check_range(magnitude_range)
        self.magnitude_range = (low, high)
        self.noise_std = _check_number(noise_std, "noise_std", low=0.0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise AllocationError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)

        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _FEATURE_STREAM]))
        directions = rng.standard_normal((self.n_true_features, self.d_in))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self._features = directions
        self.frequencies = zipf_frequencies(
            self.n_true_features, self.mean_active, self.zipf_exponent, self.max_frequency
        )
        self._features_tensor = torch.from_numpy(directions.astype(np.float32))
        self._frequencies32 = self.frequencies.astype(np.float32)

    @property
    def true_features(self) -> Tensor:
        """The true feature directions, float32 ``(n_true_features, d_in)``, unit rows, rank order."""
        return self._features_tensor.clone()

    def generate(
        self, batch_size: int, *, seed: int, batch_index: int = 0, split: str = "train"
    ) -> tuple[Tensor, Tensor]:
        """Batch ``batch_index`` of the ``(seed, split)`` stream with its true codes.

        Returns ``x`` float32 ``(batch_size, d_in)`` and ``codes`` float32 ``(batch_size, n_true)``
        with ``x = codes @ true_features + noise``.
        """
        check_batch_args(batch_size, seed, batch_index, split)
        split_id = 0 if split == "train" else 1
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TOKEN_STREAM, split_id, batch_index]))
        if self.difficulty_shape is None:
            difficulty = np.ones((batch_size, 1), dtype=np.float32)
        else:
            shape = self.difficulty_shape
            difficulty = rng.gamma(shape, 1.0 / shape, size=(batch_size, 1)).astype(np.float32)
        probability = np.minimum(np.float32(1.0), difficulty * self._frequencies32[None, :])
        active = rng.random((batch_size, self.n_true_features), dtype=np.float32) < probability
        low, high = self.magnitude_range
        codes = np.zeros(active.shape, dtype=np.float32)
        codes[active] = rng.uniform(low, high, size=int(active.sum())).astype(np.float32)
        codes_tensor = torch.from_numpy(codes)
        x = codes_tensor @ self._features_tensor
        if self.noise_std > 0:
            noise = rng.standard_normal((batch_size, self.d_in), dtype=np.float32)
            x += self.noise_std * torch.from_numpy(noise)
        return x, codes_tensor

    def batch(self, batch_size: int, *, seed: int, batch_index: int, split: str = "train") -> Tensor:
        """Batch ``batch_index`` of the ``(seed, split)`` stream, float32 ``(batch_size, d_in)``."""
        return self.generate(batch_size, seed=seed, batch_index=batch_index, split=split)[0]

    def describe(self) -> dict:
        out = super().describe()
        out.update(
            n_true_features=self.n_true_features,
            mean_active=self.mean_active,
            zipf_exponent=self.zipf_exponent,
            max_frequency=self.max_frequency,
            difficulty_shape=self.difficulty_shape,
            magnitude_range=list(self.magnitude_range),
            noise_std=self.noise_std,
            seed=self.seed,
        )
        return out


def zipf_frequencies(
    n_features: int, mean_active: float, exponent: float, max_frequency: float
) -> np.ndarray:
    """Zipf frequencies: p_r = min(max_frequency, c / r^s) for ranks r = 1..n, with sum p = mean_active
    (``allocation.zipf.water_fill``)."""
    positive_int(n_features, "n_features", allow_integral_float=False)
    if not 0 < mean_active < max_frequency * n_features:
        raise AllocationError(
            f"mean_active must lie in (0, max_frequency * n_features) = (0, {max_frequency * n_features:g}), "
            f"got {mean_active}"
        )
    return water_fill(zipf_weights(n_features, exponent), mean_active, max_frequency).numpy()


def feature_recovery(
    decoder_rows: Union[Tensor, np.ndarray], true_features: Union[Tensor, np.ndarray]
) -> float:
    """Mean over true features of the max cosine similarity to any decoder row: mean_i max_j cos(t_i, w_j).

    ``decoder_rows`` is ``(n_learned, d_in)`` and ``true_features`` ``(n_true, d_in)``; a zero row has
    cosine 0 with everything. 1.0 means every true feature has a learned row pointing exactly along it.
    """
    learned = _as_rows(decoder_rows, "decoder_rows")
    truth = _as_rows(true_features, "true_features")
    if learned.shape[1] != truth.shape[1]:
        raise AllocationError(
            f"decoder_rows have dimension {learned.shape[1]} but true_features {truth.shape[1]}; pass the "
            "decoder as (n_features, d_in) rows (transpose it if it is (d_in, n_features))"
        )
    learned = learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)
    truth = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12)
    cosines = truth @ learned.T
    return float(cosines.max(axis=1).mean())


def _as_rows(values: Union[Tensor, np.ndarray], name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = tensor_to_numpy(values)
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise AllocationError(f"{name} must be a real matrix, got dtype {values.dtype}")
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise AllocationError(f"{name} must be a non-empty 2-D (rows, d_in) matrix, got shape {values.shape}")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise AllocationError(f"{name} contains NaN or inf; check the training run that produced it")
    return values


def _check_number(
    value, name: str, *, low: float, low_open: bool = False, high: Optional[float] = None
) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
    ):
        raise AllocationError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise AllocationError(f"{name} must be {bound}, got {value:g}")
    return value


def _check_range(value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise AllocationError(f"magnitude_range must be a pair (low, high), got {value!r}") from error
    if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high):
        raise AllocationError(f"magnitude_range must satisfy 0 < low <= high, got {value!r}")
    return low, high
