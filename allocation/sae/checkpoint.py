"""Checkpoints (cfg.json + sae.safetensors + trainer state, sealed by a sha256 manifest).

A checkpoint is a directory:

    cfg.json             model, training and data configuration
    sae.safetensors      model parameters and threshold buffers
    trainer.safetensors  optimizer moments, feature-usage counters, metrics window, RNG state
    trainer.json         step, metrics history, optimizer hyper-parameters
    manifest.json        sha256 of each of the files above

Every file is covered by the manifest, so a checkpoint whose configuration or state was edited by
hand is refused as corrupt, like one whose tensors were damaged. It is written atomically (see
``allocation.sae.atomic``): a staging directory, each file fsynced, swapped in by ``os.replace``;
an interruption never leaves a half-written checkpoint under the final name (``load_checkpoint``
falls back to the moved-aside copy if the swap itself was interrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from ..errors import AllocationError
from .atomic import resolve_published, write_directory
from .model import SparseAutoencoder

PathLike = Union[str, os.PathLike]
FORMAT = "allocation-sae-checkpoint/2"
LEGACY_FORMAT = "allocation-sae-checkpoint/1"  # sha256 of the tensors only, inside trainer.json
CFG_FILE, SAE_FILE, STATE_FILE, STATE_JSON, MANIFEST = (
    "cfg.json",
    "sae.safetensors",
    "trainer.safetensors",
    "trainer.json",
    "manifest.json",
)


class CheckpointError(AllocationError):
    """A checkpoint is missing, unreadable, corrupt or from an incompatible configuration."""


def json_bytes(data: dict) -> bytes:
    """Canonical JSON (sorted keys, indented, final newline) as bytes."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def tensor_bytes(tensors: Dict[str, Tensor]) -> bytes:
    """safetensors bytes of CPU, contiguous copies of ``tensors``."""
    return save_safetensors_bytes(
        {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sealed(files: Dict[str, bytes]) -> Dict[str, bytes]:
    """``files`` plus their manifest.json."""
    manifest = {"format": FORMAT, "sha256": {name: _sha256(data) for name, data in files.items()}}
    return {**files, MANIFEST: json_bytes(manifest)}


def _resolve_existing(directory: Path) -> Path:
    resolved = resolve_published(directory)
    if resolved is not None:
        return resolved
    if directory.exists():
        raise CheckpointError(
            f"checkpoint {str(directory)!r} is a file, not a directory; "
            "pass the DIR a previous `allocation train --out DIR` wrote"
        )
    raise CheckpointError(
        f"checkpoint directory {str(directory)!r} does not exist; "
        "pass the DIR a previous `allocation train --out DIR` wrote"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing: not a complete checkpoint") from None
    except OSError as error:
        raise CheckpointError(f"{str(path)!r} is unreadable ({error})") from None


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        parsed = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is corrupt or unreadable ({error})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{str(path)!r} is corrupt: expected a JSON object")
    return parsed


def _read_json(path: Path) -> dict:
    return _parse_json(path, _read_bytes(path))


def _parse_tensors(path: Path, data: bytes) -> Dict[str, Tensor]:
    try:
        return load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is corrupt ({type(error).__name__}: {error})") from None


class _Reader:
    """Reads a checkpoint's files, each checked against the manifest's sha256 (legacy: trainer.json's)."""

    def __init__(self, directory: Path, required: Tuple[str, ...]) -> None:
        self.directory = directory
        manifest_path = directory / MANIFEST
        if manifest_path.exists():
            manifest = _read_json(manifest_path)
            hashes = manifest.get("sha256")
            if not isinstance(hashes, dict) or any(name not in hashes for name in required):
                raise CheckpointError(
                    f"{str(manifest_path)!r} is corrupt: it does not list the sha256 of {', '.join(required)}"
                )
            self.hashes: Dict[str, Optional[str]] = dict(hashes)
            return
        cfg = _read_json(directory / CFG_FILE)
        if cfg.get("format") != LEGACY_FORMAT:
            raise CheckpointError(
                f"{str(manifest_path)!r} is missing: {str(directory)!r} is not a complete checkpoint"
            )
        self.hashes = {CFG_FILE: None, STATE_JSON: None}  # the legacy format did not cover them
        state_path = directory / STATE_JSON
        if STATE_FILE in required or state_path.exists():
            legacy = _read_json(state_path).get("sha256")
            if not isinstance(legacy, dict) or any(
                name not in legacy for name in required if name.endswith(".safetensors")
            ):
                raise CheckpointError(f"{str(state_path)!r} is corrupt: no sha256 of the tensor files")
            self.hashes.update(legacy)
        else:
            self.hashes[SAE_FILE] = None

    def read(self, name: str) -> bytes:
        path = self.directory / name
        data = _read_bytes(path)
        expected = self.hashes.get(name)
        if expected is not None and _sha256(data) != expected:
            raise CheckpointError(
                f"{str(path)!r} is corrupt or was edited: its sha256 does not match {MANIFEST}; "
                "restore it or start a fresh run"
            )
        return data

    def json(self, name: str) -> dict:
        return _parse_json(self.directory / name, self.read(name))

    def tensors(self, name: str) -> Dict[str, Tensor]:
        return _parse_tensors(self.directory / name, self.read(name))


# ------------------------------------------------------------------------------------ the SAE


def save_sae(sae: SparseAutoencoder, directory: PathLike, extra_config: Optional[dict] = None) -> Path:
    """Write cfg.json + sae.safetensors + manifest.json (atomically) into ``directory``."""
    files = {
        SAE_FILE: tensor_bytes(sae.state_dict()),
        CFG_FILE: json_bytes({"format": FORMAT, "sae": sae.config(), **(extra_config or {})}),
    }
    return write_directory(Path(directory), _sealed(files))


def _sae_from(reader: _Reader) -> Tuple[SparseAutoencoder, dict]:
    directory = reader.directory
    cfg = reader.json(CFG_FILE)
    if "sae" not in cfg:
        raise CheckpointError(
            f"{str(directory / CFG_FILE)!r} has no 'sae' section: not an allocation checkpoint"
        )
    try:
        sae = SparseAutoencoder.from_config(cfg["sae"])
    except (KeyError, TypeError, AllocationError) as error:
        raise CheckpointError(f"{str(directory / CFG_FILE)!r} is corrupt ({error!r})") from None
    tensors = reader.tensors(SAE_FILE)
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{str(directory / SAE_FILE)!r} does not match cfg.json: {error}") from None
    return sae, cfg


def load_sae(directory: PathLike) -> SparseAutoencoder:
    """The SparseAutoencoder saved in ``directory`` (by ``save_sae`` or a training checkpoint)."""
    directory = _resolve_existing(Path(directory))
    return _sae_from(_Reader(directory, (CFG_FILE, SAE_FILE)))[0]


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    directory: PathLike, sae: SparseAutoencoder, config: dict, tensors: Dict[str, Tensor], state: dict
) -> Path:
    """Write a full training checkpoint atomically (see module docstring)."""
    files = {
        SAE_FILE: tensor_bytes(sae.state_dict()),
        STATE_FILE: tensor_bytes(tensors),
        CFG_FILE: json_bytes({"format": FORMAT, "sae": sae.config(), **config}),
        STATE_JSON: json_bytes(state),
    }
    return write_directory(Path(directory), _sealed(files))


def load_checkpoint(directory: PathLike) -> Tuple[SparseAutoencoder, dict, Dict[str, Tensor], dict]:
    """(sae, cfg, trainer tensors, trainer state) from a checkpoint; CheckpointError if corrupt."""
    directory = _resolve_existing(Path(directory))
    reader = _Reader(directory, (CFG_FILE, SAE_FILE, STATE_FILE, STATE_JSON))
    state = reader.json(STATE_JSON)
    sae, cfg = _sae_from(reader)
    tensors = reader.tensors(STATE_FILE)
    return sae, cfg, tensors, state
