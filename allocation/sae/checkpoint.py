"""Checkpoints (cfg.json + sae.safetensors + trainer state) and export to SAELens's on-disk format.

A checkpoint is a directory:

    cfg.json             model, training and data configuration
    sae.safetensors      model parameters and threshold buffers
    trainer.safetensors  optimizer moments, feature-usage counters, metrics window, RNG state
    trainer.json         step, metrics history, optimizer hyper-parameters, sha256 of the tensors

It is written atomically: every file goes to a fresh temporary directory (each file fsynced), which
then replaces the old checkpoint by ``os.replace``; the previous checkpoint is moved aside first and
removed last, so an interruption never leaves a half-written checkpoint under the final name
(``load_checkpoint`` falls back to the moved-aside copy if the swap itself was interrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from ..errors import AllocationError
from .model import FeatureChoice, MutualChoice, SparseAutoencoder, TopK

PathLike = Union[str, os.PathLike]
FORMAT = "allocation-sae-checkpoint/1"
CFG_FILE, SAE_FILE, STATE_FILE, STATE_JSON = (
    "cfg.json",
    "sae.safetensors",
    "trainer.safetensors",
    "trainer.json",
)


class CheckpointError(AllocationError):
    """A checkpoint is missing, unreadable, corrupt or from an incompatible configuration."""


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same directory, fsync, os.replace."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _tensor_bytes(tensors: Dict[str, Tensor]) -> bytes:
    return save_safetensors_bytes(
        {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target`` atomically, keeping the old ``target`` aside until it is done."""
    aside = target.parent / f".{target.name}.old"
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        os.replace(target, aside)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def _resolve_existing(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    aside = directory.parent / f".{directory.name}.old"
    if aside.is_dir():  # an interrupted swap: the previous complete checkpoint
        return aside
    raise CheckpointError(
        f"checkpoint directory {str(directory)!r} does not exist; "
        "pass the DIR a previous `allocation train --out DIR` wrote"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing: not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is corrupt or unreadable ({error})") from None


def _read_tensors(path: Path, expected_sha256: Optional[str] = None) -> Dict[str, Tensor]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing: not a complete checkpoint") from None
    except OSError as error:
        raise CheckpointError(f"{str(path)!r} is unreadable ({error})") from None
    if expected_sha256 is not None and _sha256(data) != expected_sha256:
        raise CheckpointError(
            f"{str(path)!r} is corrupt: its sha256 does not match trainer.json; "
            "restore it or start a fresh run"
        )
    try:
        return load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is corrupt ({type(error).__name__}: {error})") from None


# ------------------------------------------------------------------------------------ the SAE


def save_sae(sae: SparseAutoencoder, directory: PathLike, extra_config: Optional[dict] = None) -> Path:
    """Write cfg.json + sae.safetensors (atomically) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    _write_file(staging / SAE_FILE, _tensor_bytes(sae.state_dict()))
    _write_file(
        staging / CFG_FILE, _json_bytes({"format": FORMAT, "sae": sae.config(), **(extra_config or {})})
    )
    _replace_directory(staging, directory)
    return directory


def _sae_from(directory: Path, expected_sha256: Optional[str] = None) -> Tuple[SparseAutoencoder, dict]:
    cfg = _read_json(directory / CFG_FILE)
    if "sae" not in cfg:
        raise CheckpointError(
            f"{str(directory / CFG_FILE)!r} has no 'sae' section: not an allocation checkpoint"
        )
    try:
        sae = SparseAutoencoder.from_config(cfg["sae"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{str(directory / CFG_FILE)!r} is corrupt ({error!r})") from None
    tensors = _read_tensors(directory / SAE_FILE, expected_sha256)
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{str(directory / SAE_FILE)!r} does not match cfg.json: {error}") from None
    return sae, cfg


def load_sae(directory: PathLike) -> SparseAutoencoder:
    """The SparseAutoencoder saved in ``directory`` (by ``save_sae`` or a training checkpoint)."""
    directory = _resolve_existing(Path(directory))
    state = directory / STATE_JSON
    expected = _read_json(state).get("sha256", {}).get(SAE_FILE) if state.exists() else None
    return _sae_from(directory, expected)[0]


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    directory: PathLike, sae: SparseAutoencoder, config: dict, tensors: Dict[str, Tensor], state: dict
) -> Path:
    """Write a full training checkpoint atomically (see module docstring)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        sae_bytes, state_bytes = _tensor_bytes(sae.state_dict()), _tensor_bytes(tensors)
        _write_file(staging / SAE_FILE, sae_bytes)
        _write_file(staging / STATE_FILE, state_bytes)
        _write_file(staging / CFG_FILE, _json_bytes({"format": FORMAT, "sae": sae.config(), **config}))
        state = dict(state, sha256={SAE_FILE: _sha256(sae_bytes), STATE_FILE: _sha256(state_bytes)})
        _write_file(staging / STATE_JSON, _json_bytes(state))
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: PathLike) -> Tuple[SparseAutoencoder, dict, Dict[str, Tensor], dict]:
    """(sae, cfg, trainer tensors, trainer state) from a checkpoint; CheckpointError if corrupt."""
    directory = _resolve_existing(Path(directory))
    state = _read_json(directory / STATE_JSON)
    hashes = state.get("sha256")
    if not isinstance(hashes, dict) or SAE_FILE not in hashes or STATE_FILE not in hashes:
        raise CheckpointError(f"{str(directory / STATE_JSON)!r} is corrupt: no sha256 of the tensor files")
    sae, cfg = _sae_from(directory, hashes[SAE_FILE])
    tensors = _read_tensors(directory / STATE_FILE, hashes[STATE_FILE])
    return sae, cfg, tensors, state


# ------------------------------------------------------------------------------------ SAELens


def saelens_config(sae: SparseAutoencoder, **metadata) -> dict:
    """cfg.json for SAELens: TopK as 'topk'; Feature Choice / Mutual Choice as 'jumprelu' thresholds."""
    rule = sae.rule
    meta = {
        "model_name": metadata.get("model_name"),
        "hook_name": metadata.get("hook_name"),
        "hook_layer": metadata.get("hook_layer"),
        "hook_head_index": None,
        "context_size": metadata.get("context_size"),
        "dataset_path": metadata.get("dataset_path"),
        "prepend_bos": metadata.get("prepend_bos", True),
    }
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.n_features,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "finetuning_scaling_factor": False,
        "metadata": meta,
        "meta": meta,
        **meta,
        "allocation_rule": rule.to_dict(),
    }
    if isinstance(rule, TopK):
        cfg.update(
            architecture="topk", k=rule.k, activation_fn_str="topk", activation_fn_kwargs={"k": rule.k}
        )
    elif isinstance(rule, (FeatureChoice, MutualChoice)):
        cfg.update(architecture="jumprelu", activation_fn_str="relu", activation_fn_kwargs={})
    return cfg


def export_saelens(sae: SparseAutoencoder, directory: PathLike, **metadata) -> Path:
    """Write SAELens's format: cfg.json + sae_weights.safetensors (W_enc, b_enc, W_dec, b_dec[, threshold]).

    Mutual Choice exports its global threshold as a JumpReLU threshold on every feature, Feature
    Choice its per-feature thresholds: SAELens's JumpReLU encode, relu(pre) * (pre > threshold),
    then equals this SAE's eval-mode encode.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if not isinstance(sae.rule, TopK):
        weights["threshold"] = sae.threshold.clamp_min(0)
    _write_file(
        directory / "sae_weights.safetensors", _tensor_bytes({k: v.float() for k, v in weights.items()})
    )
    _write_file(directory / "cfg.json", _json_bytes(saelens_config(sae, **metadata)))
    return directory
