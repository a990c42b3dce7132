"""Export to SAELens 6's on-disk format: a directory with cfg.json + sae_weights.safetensors.

``SAE.load_from_disk(DIR)`` of SAELens 6 (checked against 6.54.12) reads it as

- TopK: ``TopKSAE`` (``architecture: "topk"``, ``k``): top-k of the affinities, then ReLU, which is
  this SAE's TopK code (the k largest positive affinities);
- Feature Choice / Mutual Choice: ``JumpReLUSAE`` (``architecture: "jumprelu"``) with this SAE's
  eval-mode thresholds (one per feature; Mutual Choice's single threshold repeated), whose encode
  relu(pre) * (pre > threshold) is this SAE's eval-mode (batch-independent) code.

Both apply b_dec to the input, as this SAE does: pre = (x - b_dec) @ W_enc + b_enc.

The cfg carries ``metadata.sae_lens_version`` (SAELens reads a cfg without it as a pre-6.0 config)
and ``metadata.hook_name``: the hook the activations came from when the data source knows it
(MiniLM: ``blocks.{layer-1}.hook_normalized_resid_post``, in TransformerLens' names for BERT;
``hook_full_embed`` for layer 0), or a data file's sidecar ``hook_name``; otherwise the placeholder
``PLACEHOLDER_HOOK_NAME``, to be replaced by the hook the activations were read at
(``allocation export RUN --hook-name NAME``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from .atomic import write_directory
from .checkpoint import json_bytes, tensor_bytes
from .model import SparseAutoencoder, TopK

PathLike = Union[str, os.PathLike]
SAELENS_VERSION = "6.54.12"  # the SAELens release whose loader and config classes this format follows
PLACEHOLDER_HOOK_NAME = "unknown_hook"
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"


def saelens_config(sae: SparseAutoencoder, **metadata: Any) -> dict:
    """cfg.json for SAELens 6: TopK as 'topk'; Feature Choice / Mutual Choice as 'jumprelu' thresholds.

    ``metadata`` (model_name, hook_name, dataset_path, context_size, ...) goes to the cfg's
    ``metadata`` section; entries that are None are left out, except that ``hook_name`` defaults to
    ``PLACEHOLDER_HOOK_NAME``.
    """
    rule = sae.rule
    meta = {key: value for key, value in metadata.items() if value is not None}
    meta.setdefault("hook_name", PLACEHOLDER_HOOK_NAME)
    meta.setdefault("hook_head_index", None)
    meta.update(
        sae_lens_version=SAELENS_VERSION,
        sae_lens_training_version=None,  # not trained with SAELens
        allocation_rule=rule.to_dict(),
    )
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.n_features,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if isinstance(rule, TopK):
        cfg.update(architecture="topk", k=rule.k, rescale_acts_by_decoder_norm=False)
    else:
        cfg.update(architecture="jumprelu")
    return cfg


def saelens_weights(sae: SparseAutoencoder) -> dict:
    """W_enc, b_enc, W_dec, b_dec (float32) and, for Feature / Mutual Choice, the eval thresholds."""
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if not isinstance(sae.rule, TopK):
        weights["threshold"] = sae.threshold.clamp_min(0)
    return {name: value.detach().float() for name, value in weights.items()}


def export_saelens(sae: SparseAutoencoder, directory: PathLike, **metadata: Any) -> Path:
    """Write ``directory`` in SAELens 6's format, atomically (the whole directory appears at once).

    ``metadata``: see ``saelens_config``. Returns the directory.
    """
    files = {
        WEIGHTS_FILE: tensor_bytes(saelens_weights(sae)),
        CFG_FILE: json_bytes(saelens_config(sae, **metadata)),
    }
    return write_directory(Path(directory), files)


def metadata_from_source(description: dict, dataset_path: Optional[str] = None) -> dict:
    """SAELens metadata from a data source's ``describe()``: model, hook, context size, dataset."""
    meta = {
        "model_name": description.get("model_name", description.get("model")),
        "hook_name": description.get("hook_name"),
        "context_size": description.get("context_size", description.get("max_length")),
        "dataset_path": dataset_path,
    }
    return {key: value for key, value in meta.items() if value is not None}
