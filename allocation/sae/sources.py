"""Activation sources: the ``ActivationSource`` interface, in-memory/memory-mapped arrays, file readers.

A source's ``batches`` stream is endless and deterministic: batch ``b`` depends only on
``(seed, b)`` (and the batch size), so a training run resumed with ``start_batch=b`` sees exactly the
batches an uninterrupted run would have seen. Finite arrays hold out their last ``heldout_fraction``
of rows: ``split="heldout"`` never yields a training row. Within a split, batches walk one seeded
permutation per epoch (sampling without replacement, epoch after epoch).

:func:`allocation.sae.data.load_activations` picks a source from a spec; the synthetic, MiniLM and
Hugging Face sources build on this module (which imports none of them).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .._validate import positive_int
from ..errors import AllocationError

SPLITS = ("train", "heldout")
SIDECAR_SUFFIX = ".json"
_FINITE_CHECK_ROWS = 65536  # rows scanned per chunk when checking a (memory-mapped) array for NaN/inf

ArrayLike = Union[np.ndarray, Tensor]
Spec = Union[str, os.PathLike, np.ndarray, Tensor, "ActivationSource"]


# --------------------------------------------------------------------------------------------------
# the interface


class ActivationSource(ABC):
    """Endless, seeded stream of float32 ``(batch_size, d_in)`` activation batches."""

    d_in: int

    @abstractmethod
    def batch(self, batch_size: int, *, seed: int, batch_index: int, split: str = "train") -> Tensor:
        """Batch number ``batch_index`` of the ``(seed, split)`` stream: float32 ``(batch_size, d_in)``."""

    def batches(
        self, batch_size: int, *, seed: int, start_batch: int = 0, split: str = "train"
    ) -> Iterator[Tensor]:
        """Yield batches ``start_batch, start_batch + 1, ...`` forever; batch b depends only on (seed, b)."""
        check_batch_args(batch_size, seed, start_batch, split)
        batch_index = start_batch
        while True:
            yield self.batch(batch_size, seed=seed, batch_index=batch_index, split=split)
            batch_index += 1

    def sample(self, n_tokens: int, *, seed: int) -> Tensor:
        """``n_tokens`` training tokens, float32 ``(n_tokens, d_in)``: batch 0 of the train stream."""
        positive_int(n_tokens, "n_tokens", allow_integral_float=False)
        check_batch_args(n_tokens, seed, 0, "train")
        return self.batch(n_tokens, seed=seed, batch_index=0, split="train")

    def describe(self) -> dict:
        """A JSON-able description of the source (for checkpoints' cfg.json)."""
        return {"kind": type(self).__name__, "d_in": self.d_in}


# --------------------------------------------------------------------------------------------------
# finite arrays


class ArraySource(ActivationSource):
    """A finite ``(n_tokens, d_in)`` array (in memory or memory-mapped); its last rows are held out.

    Rows ``[0, n_train)`` are the train split and ``[n_train, n_tokens)`` the held-out split, with
    ``n_heldout = max(1, round(heldout_fraction * n_tokens))``. Any numeric dtype is accepted and
    converted to float32 per batch, so a float16 memmap stays float16 on disk.
    """

    def __init__(
        self,
        array: ArrayLike,
        *,
        heldout_fraction: float = 0.1,
        name: str = "array",
        metadata: Optional[Mapping[str, Any]] = None,
        check_finite: bool = True,
    ):
        array = as_activation_matrix(array, name, check_finite=check_finite)
        if not isinstance(heldout_fraction, (int, float)) or not 0.0 < float(heldout_fraction) < 1.0:
            raise AllocationError(
                f"heldout_fraction must be a number strictly between 0 and 1, got {heldout_fraction!r}; "
                "the default 0.1 holds out the last 10% of rows"
            )
        n_tokens = array.shape[0]
        n_heldout = max(1, int(round(float(heldout_fraction) * n_tokens)))
        if n_tokens - n_heldout < 1:
            raise AllocationError(
                f"{name} has only {n_tokens} token(s): need at least 2 to keep one for training and one "
                "held out; pass more rows"
            )
        self.array = array
        self.d_in = int(array.shape[1])
        self.n_tokens = int(n_tokens)
        self.n_heldout = int(n_heldout)
        self.n_train = self.n_tokens - self.n_heldout
        self.heldout_fraction = float(heldout_fraction)
        self.name = name
        self.metadata = dict(metadata or {})
        self._permutations: dict[tuple[int, str], tuple[int, np.ndarray]] = {}

    def split_rows(self, split: str = "train") -> np.ndarray:
        """The rows of one split in storage order (a view; may be a memmap), e.g. to evaluate once."""
        check_split(split)
        return self.array[: self.n_train] if split == "train" else self.array[self.n_train :]

    def batch(self, batch_size: int, *, seed: int, batch_index: int, split: str = "train") -> Tensor:
        """Rows at stream positions ``[b * batch_size, (b + 1) * batch_size)`` of the epoch permutations."""
        check_batch_args(batch_size, seed, batch_index, split)
        rows = self._stream_rows(batch_size, seed, batch_index, split)
        offset = 0 if split == "train" else self.n_train
        values = np.asarray(self.array[rows + offset], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(values))

    def describe(self) -> dict:
        out = super().describe()
        out.update(
            name=self.name,
            n_tokens=self.n_tokens,
            n_train=self.n_train,
            n_heldout=self.n_heldout,
            dtype=str(self.array.dtype),
        )
        out.update({k: v for k, v in self.metadata.items() if k not in out})
        return out

    def _stream_rows(self, batch_size: int, seed: int, batch_index: int, split: str) -> np.ndarray:
        size = self.n_train if split == "train" else self.n_heldout
        start = batch_index * batch_size
        stop = start + batch_size
        pieces = []
        position = start
        while position < stop:
            epoch, offset = divmod(position, size)
            take = min(size - offset, stop - position)
            pieces.append(self._permutation(size, seed, split, epoch)[offset : offset + take])
            position += take
        return np.concatenate(pieces)

    def _permutation(self, size: int, seed: int, split: str, epoch: int) -> np.ndarray:
        """The seeded row order of one epoch; one cached per (seed, split)."""
        cached = self._permutations.get((seed, split))
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), epoch]))
        permutation = rng.permutation(size)
        self._permutations[(seed, split)] = (epoch, permutation)
        return permutation



# --------------------------------------------------------------------------------------------------
# reading and writing activation files


def read_npy(path: Path, name: str) -> np.ndarray:
    """Memory-map a .npy file (read-only)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises ValueError / OSError / EOFError for bad files
        raise AllocationError(
            f"{name} is not a readable .npy array ({type(error).__name__}: {error}); "
            "write it with numpy.save(path, array)"
        ) from error


def read_safetensors(path: Path, name: str, key: Optional[str]) -> tuple[np.ndarray, str]:
    """Load one tensor of a .safetensors file as a numpy array (bfloat16 becomes float32)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = sorted(handle.keys())
            if key is None:
                if len(keys) != 1:
                    raise AllocationError(
                        f"{name} holds {len(keys)} tensors {keys[:10]}; pass key=<name> to pick one"
                    )
                key = keys[0]
            elif key not in keys:
                raise AllocationError(f"key {key!r} is not in {name}; its tensors are {keys[:10]}")
            tensor = handle.get_tensor(key)
    except AllocationError:
        raise
    except Exception as error:
        raise AllocationError(
            f"{name} is not a readable .safetensors file ({type(error).__name__}: {error}); "
            "write it with safetensors.torch.save_file({'activations': tensor}, path)"
        ) from error
    return tensor_to_numpy(tensor), key


def read_memmap(
    path: Path, name: str, *, shape: Optional[tuple] = None, dtype: Optional[str] = None
) -> tuple[np.memmap, dict]:
    """Memory-map a raw C-order file whose shape/dtype come from ``<path>.json`` or the arguments."""
    sidecar_path = sidecar_for(path)
    sidecar: dict = {}
    if sidecar_path.exists():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError) as error:
            raise AllocationError(
                f"sidecar {str(sidecar_path)!r} of {name} is not valid JSON ({error}); "
                'rewrite it as {"shape": [n_tokens, d_in], "dtype": "float32"}'
            ) from error
        if not isinstance(sidecar, dict):
            raise AllocationError(
                f"sidecar {str(sidecar_path)!r} must hold a JSON object with shape and dtype"
            )
    shape = shape if shape is not None else sidecar.get("shape")
    dtype = dtype if dtype is not None else sidecar.get("dtype")
    if shape is None or dtype is None:
        raise AllocationError(
            f"{name} is not .npy or .safetensors, so it is read as a raw memmap, which needs its shape and "
            f"dtype: write {str(sidecar_path)!r} with "
            '{"shape": [n_tokens, d_in], "dtype": "float32"} or pass shape=(n, d), dtype="float32"'
        )
    try:
        shape = tuple(int(s) for s in shape)
        numpy_dtype = np.dtype(dtype)
    except (TypeError, ValueError) as error:
        raise AllocationError(
            f"{name}: shape {shape!r} / dtype {dtype!r} are not a valid shape and numpy dtype ({error})"
        ) from error
    expected = int(np.prod(shape)) * numpy_dtype.itemsize
    actual = path.stat().st_size
    if expected != actual:
        raise AllocationError(
            f"{name} has {actual} bytes but shape {shape} of {numpy_dtype} needs {expected}; "
            "fix the shape/dtype in the sidecar (or the arguments) to match the file"
        )
    if expected == 0:
        raise AllocationError(f"{name} is empty (shape {shape}); pass at least one token")
    try:
        return np.memmap(path, dtype=numpy_dtype, mode="r", shape=shape), sidecar
    except (OSError, ValueError) as error:
        raise AllocationError(f"{name} could not be memory-mapped ({error}); check the file") from error


def write_memmap(path: Union[str, os.PathLike], array: ArrayLike, **metadata: Any) -> Path:
    """Write ``array`` as a raw C-order file plus its ``<path>.json`` sidecar (shape, dtype, metadata).

    The data and the sidecar are each written to a temporary name and renamed, the sidecar last, so a
    sidecar's presence means the file is complete.
    """
    path = Path(path)
    values = tensor_to_numpy(array) if isinstance(array, Tensor) else np.asarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    np.ascontiguousarray(values).tofile(temporary)
    os.replace(temporary, path)
    write_sidecar(path, shape=list(values.shape), dtype=str(values.dtype), **metadata)
    return path


def write_sidecar(path: Path, **fields: Any) -> Path:
    """Atomically write the JSON sidecar ``<path>.json``."""
    sidecar_path = sidecar_for(path)
    temporary = sidecar_path.with_name(sidecar_path.name + ".tmp")
    temporary.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, sidecar_path)
    return sidecar_path


def sidecar_for(path: Path) -> Path:
    """The sidecar describing a raw memmap file: ``<path>.json``."""
    return Path(path).with_name(Path(path).name + SIDECAR_SUFFIX)


# --------------------------------------------------------------------------------------------------
# checks


def as_activation_matrix(array: ArrayLike, name: str, *, check_finite: bool = True) -> np.ndarray:
    """Return ``array`` as a 2-D numeric numpy array (no copy for numpy/memmap input), or raise."""
    if isinstance(array, Tensor):
        array = tensor_to_numpy(array)
    if not isinstance(array, np.ndarray):
        raise AllocationError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}")
    if array.dtype.kind not in "biuf":
        raise AllocationError(
            f"{name} must hold real numbers, got dtype {array.dtype}; convert it with .astype('float32')"
        )
    if array.ndim != 2:
        hint = (
            f"; flatten the leading dimensions with x.reshape(-1, {array.shape[-1]})"
            if array.ndim > 2
            else "; add a feature axis with x.reshape(-1, 1) or pass (n_tokens, d_in) rows"
        )
        raise AllocationError(
            f"{name} must be a 2-D (n_tokens, d_in) matrix, got shape {tuple(array.shape)}{hint}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise AllocationError(
            f"{name} is empty (shape {tuple(array.shape)}); pass at least one token and one dimension"
        )
    if check_finite and array.dtype.kind == "f":
        for start in range(0, array.shape[0], _FINITE_CHECK_ROWS):
            chunk = np.asarray(array[start : start + _FINITE_CHECK_ROWS])
            if not np.isfinite(chunk).all():
                bad_row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
                raise AllocationError(
                    f"{name} contains NaN or inf (first at row {bad_row}); drop or clean those rows "
                    "before training, e.g. x[np.isfinite(x).all(axis=1)]"
                )
    return array


def tensor_to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU numpy view/copy of a tensor; dtypes numpy lacks (bfloat16) become float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    if tensor.is_complex():
        raise AllocationError(f"activations must be real, got a {tensor.dtype} tensor; pass x.real")
    return tensor.numpy()


def check_split(split: Any) -> str:
    """``split`` is one of SPLITS."""
    if split not in SPLITS:
        raise AllocationError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_batch_args(batch_size: Any, seed: Any, start_batch: Any, split: Any) -> None:
    """Validate the arguments of ``batches``."""
    positive_int(batch_size, "batch_size", allow_integral_float=False)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AllocationError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise AllocationError(
            f"start_batch must be a non-negative integer (the batch to resume at), got {start_batch!r}"
        )
    check_split(split)
