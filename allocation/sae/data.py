"""``load_activations(spec)``: the one entry point from a data spec to an :class:`ActivationSource`.

A spec names a source ("synthetic", "minilm", "hf"), a file (.npy, .safetensors, raw memmap with a
JSON sidecar) or an in-memory array; the sources themselves live in :mod:`allocation.sae.sources`
(arrays, files), :mod:`allocation.sae.synthetic`, :mod:`allocation.sae.minilm` and
:mod:`allocation.sae.hf`. This module imports them; none of them imports it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from torch import Tensor

from ..errors import AllocationError
from .hf import hf_activations
from .minilm import minilm_activations
from .sources import (  # noqa: F401  (re-exported: they used to live here)
    SIDECAR_SUFFIX,
    SPLITS,
    ActivationSource,
    ArrayLike,
    ArraySource,
    Spec,
    as_activation_matrix,
    check_batch_args,
    check_split,
    read_memmap,
    read_npy,
    read_safetensors,
    sidecar_for,
    tensor_to_numpy,
    write_memmap,
    write_sidecar,
)
from .synthetic import SyntheticSource

# --------------------------------------------------------------------------------------------------
# loading


def load_activations(spec: Spec, **kwargs: Any) -> ActivationSource:
    """Return an :class:`ActivationSource` for ``spec``.

    ``spec`` is ``"synthetic"`` (kwargs go to :class:`~allocation.sae.synthetic.SyntheticSource`;
    defaults d_in=64, n_true_features=256), ``"minilm"`` (kwargs go to
    :func:`~allocation.sae.minilm.minilm_activations`), ``"hf"`` (kwargs go to
    :func:`~allocation.sae.hf.hf_activations`: ``model=PATH, layer=, site=, text=, n_tokens=``), a
    path to a ``.npy`` file, a ``.safetensors`` file (``key=`` picks the tensor when there are
    several) or a raw memmap with a sidecar
    ``<path>.json`` holding ``{"shape": [n, d], "dtype": "float32"}`` (or pass ``shape=``/``dtype=``),
    a numpy array, a torch tensor, or an existing ActivationSource (returned as is). Array kwargs:
    ``heldout_fraction`` (default 0.1).
    """
    if isinstance(spec, ActivationSource):
        if kwargs:
            raise AllocationError(
                f"data is already an ActivationSource; options {sorted(kwargs)} cannot apply to it, drop them"
            )
        return spec
    if isinstance(spec, str) and spec == "synthetic":
        _reject_unknown(kwargs, keyword_names(SyntheticSource), "the synthetic source")
        options = {"d_in": 64, "n_true_features": 256}
        options.update(kwargs)
        return SyntheticSource(**options)
    if isinstance(spec, str) and spec == "minilm":
        _reject_unknown(kwargs, keyword_names(minilm_activations), "the minilm source")
        return minilm_activations(**kwargs)
    if isinstance(spec, str) and spec == "hf":
        _reject_unknown(kwargs, keyword_names(hf_activations), "the hf source")
        return hf_activations(**kwargs)
    if isinstance(spec, (np.ndarray, Tensor)):
        _reject_unknown(kwargs, ("heldout_fraction",), "an in-memory array")
        return ArraySource(spec, name="data", **kwargs)
    if isinstance(spec, (str, os.PathLike)):
        _reject_unknown(kwargs, ("key", "shape", "dtype", "heldout_fraction"), "a data file")
        return _load_path(Path(spec), **kwargs)
    raise AllocationError(
        f"data must be 'synthetic', 'minilm', 'hf', a file path, a numpy array or a torch tensor, "
        f"got {type(spec).__name__}"
    )


def _load_path(
    path: Path,
    *,
    key: Optional[str] = None,
    shape: Optional[tuple] = None,
    dtype: Optional[str] = None,
    heldout_fraction: float = 0.1,
) -> ArraySource:
    name = f"data file {str(path)!r}"
    if not path.exists():
        raise AllocationError(
            f"{name} does not exist; pass 'synthetic', 'minilm' or the path of a .npy, .safetensors "
            "or raw memmap file (with a <file>.json sidecar giving shape and dtype)"
        )
    if path.is_dir():
        raise AllocationError(f"{name} is a directory; pass the path of the activation file inside it")
    if not os.access(path, os.R_OK):
        raise AllocationError(f"{name} is not readable; fix its permissions (chmod +r)")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".safetensors") and (shape is not None or dtype is not None):
        raise AllocationError(f"shape/dtype only apply to raw memmap files; {name} stores its own, drop them")
    if suffix == ".npy":
        if key is not None:
            raise AllocationError(f"key only applies to .safetensors files; drop it for {name}")
        array = read_npy(path, name)
        metadata = {"path": str(path), "format": "npy"}
    elif suffix == ".safetensors":
        array, key = read_safetensors(path, name, key)
        metadata = {"path": str(path), "format": "safetensors", "key": key}
    else:
        if key is not None:
            raise AllocationError(f"key only applies to .safetensors files; drop it for {name}")
        array, sidecar = read_memmap(path, name, shape=shape, dtype=dtype)
        metadata = {k: v for k, v in sidecar.items() if k not in ("shape", "dtype")}
        metadata.update(path=str(path), format="memmap")
    return ArraySource(array, heldout_fraction=heldout_fraction, name=name, metadata=metadata)


def _reject_unknown(kwargs: Mapping[str, Any], allowed: tuple, what: str) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise AllocationError(f"options {unknown} do not apply to {what}; allowed: {list(allowed)}")


def keyword_names(function: Any) -> tuple:
    """The keyword arguments ``function`` (or a class's ``__init__``) accepts, in signature order."""
    return tuple(
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name != "self"
    )
