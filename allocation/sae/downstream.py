"""Downstream fidelity: splice an SAE's reconstruction into the model at its hook, on held-out text.

    report = evaluate_downstream("runs/demo/topk")          # any saved run on data='hf' / 'minilm'
    report = downstream_fidelity(sae, "path/to/model", layer=6, site="resid_post", windows=windows)

At the hooked site, every position the SAE was trained on (not padding, not special tokens) is
replaced by the SAE's eval-mode reconstruction ("sae"), by zeros ("zero" ablation) or by the mean
training activation ("mean" ablation); the rest of the forward pass is the model's own.

- causal LMs: next-token cross-entropy CE (mean over predicted tokens) clean, spliced and ablated;
  loss recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean) (1: as good as the model, 0: as bad
  as deleting the site; zero ablation by default, as SAEBench and SAELens report it); KL = mean over
  those positions of sum_v p_clean(v) (log p_clean(v) - log p_sae(v)).
- encoders (sentence embeddings, MiniLM): the mean-pooled final hidden state e (the sentence-transformers
  embedding before normalisation) of each window; cosine(e_sae, e_clean), averaged over windows, and
  the fraction recovered = (cos_sae - cos_ablated) / (1 - cos_ablated) against mean ablation.

The held-out text is the corpus windows whose rows all lie in the source's held-out split (the last
10% of rows), rebuilt from the cache's token file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import AllocationError
from .hf import HFModel, hooked, load_hf_model, padded, read_tokens

Reconstruct = Callable[[Tensor], Tensor]
Window = tuple[Sequence[int], int, int]  # input ids, first and stop of the spliced positions
ABLATIONS = ("zero", "mean")
DEFAULT_TOKENS = 2048


def sae_reconstruction(sae: Any) -> Reconstruct:
    """x (n, d) -> the SAE's eval-mode reconstruction x_hat (n, d) (thresholds: no batch mates)."""

    def reconstruct(x: Tensor) -> Tensor:
        was_training = sae.training
        sae.eval()
        device = sae.W_enc.device
        try:
            with torch.no_grad():
                return sae(x.to(device=device, dtype=sae.W_enc.dtype)).x_hat.to(device=x.device, dtype=x.dtype)
        finally:
            sae.train(was_training)

    return reconstruct


def _splice(reconstruct: Optional[Reconstruct], kept: Tensor, constant: Optional[Tensor]) -> Callable:
    def replace(hidden: Tensor) -> Tensor:
        mask = kept.to(hidden.device)
        new = hidden.clone()
        rows = hidden[mask]
        if reconstruct is not None:
            new[mask] = reconstruct(rows).to(hidden.dtype)
        else:
            new[mask] = constant.to(device=hidden.device, dtype=hidden.dtype).expand_as(rows)
        return new

    return replace


def _outputs(hf: HFModel, layer: int, site: str, input_ids: Tensor, attention: Tensor, splice: Optional[Callable]):
    device = next(hf.model.parameters()).device
    with torch.inference_mode():
        if splice is None:
            out = hf.model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
        else:
            with hooked(hf, layer, site, splice):
                out = hf.model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
    if hf.causal:
        return torch.log_softmax(out.logits.float(), dim=-1).cpu()
    hidden = out.last_hidden_state.float().cpu()
    weights = attention.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (batch, d) mean pooling


def _nll(log_probs: Tensor, targets: Tensor, valid: Tensor) -> float:
    """Summed next-token negative log-likelihood -sum log p(x_{t+1} | x_<=t) over the valid positions."""
    nll = -log_probs[:, :-1].gather(-1, targets).squeeze(-1)
    return float(nll[valid].double().sum())


def downstream_fidelity(
    sae: Union[Any, Reconstruct],
    model: Union[str, Path, HFModel],
    *,
    layer: int,
    site: str = "resid_post",
    windows: Sequence[Window],
    mean: Optional[Union[Tensor, np.ndarray]] = None,
    ablation: Optional[str] = None,
    batch_size: int = 16,
) -> dict:
    """Splice ``sae`` (a SparseAutoencoder, or any x (n, d) -> x_hat (n, d)) into ``model`` at
    ``site`` of ``layer`` over ``windows`` and compare with the clean and the ablated model.

    ``mean`` (d,): the mean activation for mean ablation (skipped when None); ``ablation``: the one
    "loss recovered" / "recovered" use (default zero for causal LMs, mean for encoders).
    Returns the numbers of the module docstring (CE in nats per token).
    """
    hf = model if isinstance(model, HFModel) else load_hf_model(model)
    reconstruct = sae if not isinstance(sae, torch.nn.Module) else sae_reconstruction(sae)
    if not windows:
        raise AllocationError("downstream_fidelity needs at least one window of held-out text")
    if ablation is None:
        ablation = "zero" if hf.causal else "mean"
    if ablation not in ABLATIONS:
        raise AllocationError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "mean" and mean is None:
        raise AllocationError("ablation='mean' needs mean= (the mean training activation, shape (d,))")
    variants: dict[str, Optional[tuple]] = {"sae": (reconstruct, None), "zero": (None, torch.zeros(hf.d_model))}
    if mean is not None:
        variants["mean"] = (None, torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1))
    sums: dict[str, float] = {}
    counts = {"predicted": 0, "spliced": 0, "windows": 0}
    pad = int(getattr(hf.tokenizer, "pad_token_id", None) or 0)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][0]))
    for start in range(0, len(order), batch_size):
        members = [windows[i] for i in order[start : start + batch_size]]
        input_ids, attention = padded([m[0] for m in members], pad)
        kept = torch.zeros_like(attention, dtype=torch.bool)
        for row, (_, first, stop) in enumerate(members):
            kept[row, first:stop] = True
        counts["spliced"] += int(kept.sum())
        counts["windows"] += len(members)
        clean = _outputs(hf, layer, site, input_ids, attention, None)
        if hf.causal:
            valid = (attention[:, 1:] * attention[:, :-1]).bool()
            targets = input_ids[:, 1:].unsqueeze(-1)
            counts["predicted"] += int(valid.sum())

            sums["ce_clean"] = sums.get("ce_clean", 0.0) + _nll(clean, targets, valid)
        for name, (fn, constant) in variants.items():
            out = _outputs(hf, layer, site, input_ids, attention, _splice(fn, kept, constant))
            if hf.causal:
                kl = (clean.exp() * (clean - out)).sum(-1)[:, :-1][valid]
                sums[f"ce_{name}"] = sums.get(f"ce_{name}", 0.0) + _nll(out, targets, valid)
                sums[f"kl_{name}"] = sums.get(f"kl_{name}", 0.0) + float(kl.double().sum())
            else:
                cosine = torch.nn.functional.cosine_similarity(out.double(), clean.double(), dim=-1)
                sums[f"cosine_{name}"] = sums.get(f"cosine_{name}", 0.0) + float(cosine.sum())
    report: dict = {
        "kind": hf.kind,
        "model": str(hf.path),
        "layer": int(layer),
        "site": site,
        "windows": counts["windows"],
        "spliced_tokens": counts["spliced"],
        "ablation": ablation,
    }
    if hf.causal:
        n = max(counts["predicted"], 1)
        report["predicted_tokens"] = counts["predicted"]
        for key, value in sums.items():
            report[key.replace("_zero", "_zero_ablation").replace("_mean", "_mean_ablation")] = value / n
        report["ce_ablated"] = report[f"ce_{ablation}_ablation"]
        report["kl_ablated"] = report[f"kl_{ablation}_ablation"]
        report["loss_recovered"] = loss_recovered(report["ce_clean"], report["ce_sae"], report["ce_ablated"])
    else:
        n = max(counts["windows"], 1)
        for key, value in sums.items():
            report[key.replace("_zero", "_zero_ablation").replace("_mean", "_mean_ablation")] = value / n
        report["cosine_ablated"] = report[f"cosine_{ablation}_ablation"]
        report["cosine_recovered"] = fraction_recovered(report["cosine_sae"], report["cosine_ablated"])
    return report


def loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_sae) / (CE_ablated - CE_clean); NaN when ablating changes nothing."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_sae) / gap if abs(gap) > 1e-12 else math.nan


def fraction_recovered(cosine_sae: float, cosine_ablated: float) -> float:
    """(cos_sae - cos_ablated) / (1 - cos_ablated): 1 = the clean embedding, 0 = no better than ablation."""
    gap = 1.0 - cosine_ablated
    return (cosine_sae - cosine_ablated) / gap if abs(gap) > 1e-12 else math.nan


# --------------------------------------------------------------------------------------------------
# from a source / a saved run


def knows_model(metadata: dict) -> bool:
    """Whether an activation source's metadata names the model and hook it came from."""
    return all(key in metadata for key in ("model_path", "layer", "site", "cache_path"))


def heldout_windows(metadata: dict, n_train: int, max_tokens: int = DEFAULT_TOKENS) -> list[Window]:
    """Windows of the held-out split (every row after the window of the last training row), rebuilt
    from the cache's token file with the tokenizer's special tokens, until ``max_tokens`` rows."""
    tokens = read_tokens(Path(metadata["cache_path"]))
    if tokens is None:
        raise AllocationError(
            f"the activation cache {metadata['cache_path']!r} has no token file; extract it again (rebuild=True)"
        )
    window_of_row = tokens[:, 1]
    last_train_window = int(window_of_row[n_train - 1]) if n_train > 0 else -1
    start = int(np.searchsorted(window_of_row, last_train_window, side="right"))
    prefix, suffix = list(metadata.get("special_prefix", [])), list(metadata.get("special_suffix", []))
    keep = bool(metadata.get("keep_special_tokens", False))
    windows: list[Window] = []
    rows = 0
    position = start
    while position < len(tokens) and rows < max_tokens:
        stop = int(np.searchsorted(window_of_row, window_of_row[position], side="right"))
        ids = [int(i) for i in tokens[position:stop, 0]]
        if keep:
            windows.append((ids, 0, len(ids)))
        else:
            windows.append(([*prefix, *ids, *suffix], len(prefix), len(prefix) + len(ids)))
        rows += stop - position
        position = stop
    if not windows:
        raise AllocationError(
            "the held-out split holds no whole window of text (the source is too small); extract more tokens"
        )
    return windows


def mean_activation(source: Any, max_rows: int = 200_000) -> Tensor:
    """Mean (d,) of the source's training rows (the first ``max_rows``), in float64 chunks."""
    rows = source.split_rows("train")[:max_rows]
    total = np.zeros(rows.shape[1], dtype=np.float64)
    for start in range(0, rows.shape[0], 65536):
        total += np.asarray(rows[start : start + 65536], dtype=np.float64).sum(0)
    return torch.from_numpy(total / max(rows.shape[0], 1)).float()


def source_downstream(
    sae: Any, source: Any, *, n_tokens: int = DEFAULT_TOKENS, ablation: Optional[str] = None, batch_size: int = 16
) -> dict:
    """:func:`downstream_fidelity` of ``sae`` on the held-out text of an ``hf`` / ``minilm`` source."""
    metadata = getattr(source, "metadata", {}) or {}
    if not knows_model(metadata):
        raise AllocationError(
            "downstream fidelity needs activations that name their model and hook (data='hf' or 'minilm'); "
            "this source does not"
        )
    hf = load_hf_model(metadata["model_path"], metadata.get("model_dtype", "float32"))
    windows = heldout_windows(metadata, source.n_train, n_tokens)
    return downstream_fidelity(
        sae,
        hf,
        layer=int(metadata["layer"]),
        site=metadata["site"],
        windows=windows,
        mean=mean_activation(source),
        ablation=ablation,
        batch_size=batch_size,
    )


def open_run(run: Union[str, Path]) -> tuple[Any, Any]:
    """(sae, activation source or None) of a saved run (``RUN/checkpoint``, or a checkpoint itself);
    the source is the run's activation cache when it still exists."""
    from .atomic import resolve_published
    from .checkpoint import CFG_FILE, SAE_FILE, _Reader, _sae_from
    from .sources import ArraySource, read_memmap

    run = Path(run)
    directory = resolve_published(run / "checkpoint") or resolve_published(run)
    if directory is None or not (directory / CFG_FILE).is_file():
        raise AllocationError(
            f"{str(run)!r} is not a run directory: no checkpoint/cfg.json (pass the --out of allocation train, "
            "or RUN/<rule> for a comparison run)"
        )
    sae, cfg = _sae_from(_Reader(directory, (CFG_FILE, SAE_FILE)))
    described = cfg.get("data_source", {})
    cache_path = described.get("cache_path")
    if not cache_path or not Path(cache_path).exists():
        return sae, None
    array, sidecar = read_memmap(Path(cache_path), f"activation cache {cache_path!r}")
    fraction = described.get("n_heldout", 0) / max(described.get("n_tokens", 1), 1) or 0.1
    return sae, ArraySource(array, heldout_fraction=fraction, name=cache_path, metadata=sidecar, check_finite=False)


def run_config(run: Union[str, Path]) -> dict:
    """The cfg.json of a saved run's checkpoint."""
    from .atomic import resolve_published
    from .checkpoint import CFG_FILE, _Reader

    run = Path(run)
    directory = resolve_published(run / "checkpoint") or resolve_published(run)
    return _Reader(directory, (CFG_FILE,)).json(CFG_FILE)


def evaluate_downstream(
    run: Union[str, Path, Any],
    data: Any = None,
    *,
    n_tokens: int = DEFAULT_TOKENS,
    ablation: Optional[str] = None,
    batch_size: int = 16,
) -> dict:
    """Downstream fidelity of a saved run (directory) or of an SAE with ``data`` (an hf/minilm source)."""
    if isinstance(run, (str, Path)):
        sae, source = open_run(run)
    else:
        sae, source = run, None
    if data is not None:
        from .data import load_activations

        source = data if hasattr(data, "metadata") else load_activations(data)
    if source is None:
        raise AllocationError(
            "no activation cache to take the model and held-out text from: the run did not train on "
            "data='hf' / 'minilm' or its cache is gone; pass data=load_activations('hf', ...)"
        )
    return source_downstream(sae, source, n_tokens=n_tokens, ablation=ablation, batch_size=batch_size)


def trainer_downstream(trainer: Any) -> Optional[dict]:
    """The ``downstream`` block of a run's summary: on by default where the data knows its model."""
    cfg = trainer.config
    enabled = getattr(cfg, "downstream", None)
    if enabled is False:
        return None
    metadata = getattr(trainer.source, "metadata", {}) or {}
    if not knows_model(metadata):
        if enabled:
            raise AllocationError("downstream=True needs data='hf' or 'minilm' (activations that name their model)")
        return None
    return source_downstream(trainer.sae, trainer.source, n_tokens=getattr(cfg, "downstream_tokens", DEFAULT_TOKENS))


def check_downstream(config: Any, source: Any) -> None:
    """Fail before training when downstream=True cannot be honoured by ``source``."""
    if getattr(config, "downstream", None) and not knows_model(getattr(source, "metadata", {}) or {}):
        raise AllocationError(
            "downstream=True (--downstream) needs data='hf' or 'minilm' (activations that name their model "
            "and hook); drop it for this data"
        )
