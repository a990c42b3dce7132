"""Activations of any local Hugging Face transformers model over a local text corpus, cached on disk.

    source = load_activations("hf", model="path/to/model", layer=6, site="resid_post",
                              text="corpus.txt", n_tokens=200_000)

The model is a directory written by ``save_pretrained`` (loaded with ``local_files_only=True``:
nothing downloads); causal LMs load with ``AutoModelForCausalLM``, everything else with
``AutoModel``. Sites, for ``layer`` L of a model with N blocks (block l is 1-based here):

- ``resid_post``: the residual stream after block L (L = 0: the embedding output, the input of
  block 1), i.e. ``output_hidden_states[L]`` (for L = N on models with a final norm, e.g. GPT-2's
  ``ln_f``, the last block's output *before* that norm);
- ``attn_out`` / ``mlp_out``: the output of block L's attention / MLP sub-module, before it is added
  to the residual stream (L = 1..N).

The corpus (``text``) is a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file
(one JSON object per line, its ``text_field``), a directory of such files (sorted, recursively), a
``datasets`` dataset saved with ``save_to_disk`` (column ``text_field``) or, from Python, a list of
strings. Each document is tokenised without special tokens, cut into windows of ``max_length``
minus the tokenizer's special tokens (BERT's [CLS]/[SEP], a BOS, or none), wrapped in them and run
through the model; every non-special position (all of them with ``keep_special_tokens``) is one
activation row, in corpus order, until ``n_tokens`` rows. Extraction streams: documents are read,
tokenised and run a buffer at a time and rows are written straight into the memory-mapped cache, so
a corpus larger than memory is fine. A corpus with fewer than ``n_tokens`` tokens is an error (no
silent short run). Later layers are not run (the forward stops at the hook).

Cache: ``<cache_dir>/hf-<model>_<site><layer>_<n>tok_len<max_length>_<key>.f32`` (+ ``.json``
sidecar, + ``.tokens.i32``: per row its token id and window index, for ``allocation inspect`` and the
downstream evaluation). ``key`` hashes the model files (config, tokenizer, weights: small files
whole, large ones by size and their first and last MiB), the corpus bytes, the layer, site,
``n_tokens``, ``max_length``, ``keep_special_tokens``, ``text_field``, ``dtype`` and
``model_dtype``: a changed input never reuses a stale cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .._validate import positive_int
from ..errors import AllocationError
from .sources import ArraySource, read_memmap, sidecar_for, write_sidecar

SITES = ("resid_post", "attn_out", "mlp_out")
DTYPES = {"float32": "f32", "float16": "f16"}
MODEL_DTYPES = ("float32", "float16", "bfloat16")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
DEFAULT_N_TOKENS = 100_000
DEFAULT_MAX_LENGTH = 128
TOKENS_SUFFIX = ".tokens.i32"
_WHOLE_FILE_BYTES = 64 << 20  # model files up to this size are hashed whole
_EDGE_BYTES = 1 << 20
# sub-module of a block whose output is the site, first match wins (post-LN BERT: the projection
# before the residual add and LayerNorm)
_SITE_MODULES = {
    "attn_out": ("attention.output.dense", "attn", "self_attn", "attention", "self_attention"),
    "mlp_out": ("output.dense", "mlp", "feed_forward", "ffn"),
}
PathLike = Union[str, os.PathLike]


class _StopForward(Exception):
    """Raised by the capture hook: the layers after the site need not run."""


# --------------------------------------------------------------------------------------------------
# the model


@dataclass
class HFModel:
    """A loaded local model: tokenizer, module (eval mode), its kind and its transformer blocks."""

    path: Path
    tokenizer: Any
    model: Any
    causal: bool  # a causal LM (has next-token logits) or an encoder (sentence embeddings)
    blocks: Any  # the nn.ModuleList of transformer blocks
    blocks_name: str

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def kind(self) -> str:
        return "causal-lm" if self.causal else "encoder"


def require_transformers() -> Any:
    """Import transformers offline (HF_HUB_OFFLINE=1), or raise naming the extra to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise AllocationError(
            "data='hf' needs the transformers package; install the optional extra: pip install 'allocation[real]'"
        ) from error
    return transformers


def check_model_dir(model: Any) -> Path:
    """``model`` as an existing local model directory (with config.json), or a clear error."""
    if not isinstance(model, (str, os.PathLike)):
        raise AllocationError(
            f"model must be the path of a local transformers model directory, got {type(model).__name__}"
        )
    path = Path(model).expanduser()
    if not path.is_dir():
        raise AllocationError(
            f"model {str(model)!r} is not a local directory: models load with local_files_only=True and "
            "nothing downloads; pass the directory written by save_pretrained (download it yourself first, "
            "e.g. huggingface-cli download NAME --local-dir DIR)"
        )
    if not (path / "config.json").is_file():
        raise AllocationError(
            f"model directory {str(path)!r} has no config.json: not a transformers model saved with save_pretrained"
        )
    return path.resolve()


def is_causal_config(config: Any) -> bool:
    """A causal LM config: its architectures name a *ForCausalLM / *LMHeadModel class, or is_decoder."""
    names = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in names):
        return True
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False)


@functools.lru_cache(maxsize=2)
def _load_model(path: str, model_dtype: str) -> HFModel:
    transformers = require_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        causal = is_causal_config(config)
        loader = AutoModelForCausalLM if causal else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        dtype_keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        model = loader.from_pretrained(path, local_files_only=True, **{dtype_keyword: getattr(torch, model_dtype)})
    except AllocationError:
        raise
    except Exception as error:
        raise AllocationError(
            f"the model in {path!r} could not be loaded with local_files_only=True "
            f"({type(error).__name__}: {str(error)[:300]}); it needs config.json, the weights and the "
            "tokenizer files written by save_pretrained"
        ) from error
    finally:
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    blocks_name, blocks = find_blocks(model)
    return HFModel(Path(path), tokenizer, model, causal, blocks, blocks_name)


def load_hf_model(model: PathLike, model_dtype: str = "float32") -> HFModel:
    """Load (once per process, two kept) the local model directory ``model`` with its tokenizer."""
    if model_dtype not in MODEL_DTYPES:
        raise AllocationError(f"model_dtype must be one of {MODEL_DTYPES}, got {model_dtype!r}")
    return _load_model(str(check_model_dir(model)), model_dtype)


def find_blocks(model: Any) -> tuple[str, Any]:
    """(name, ModuleList) of the transformer blocks: the ModuleList of num_hidden_layers modules."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0
    ]
    matching = [c for c in candidates if n_layers is None or len(c[1]) == n_layers]
    if not matching:
        raise AllocationError(
            f"could not find the transformer blocks of {type(model).__name__} (no ModuleList of "
            f"num_hidden_layers={n_layers} modules); this architecture is not supported"
        )
    return min(matching, key=lambda c: (c[0].count("."), c[0]))


def check_site(hf: HFModel, layer: Any, site: Any) -> None:
    """Raise unless ``site`` exists at ``layer`` of the model (naming the valid range)."""
    if site not in SITES:
        raise AllocationError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    n = hf.n_layers
    low = 0 if site == "resid_post" else 1
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not low <= layer <= n:
        raise AllocationError(
            f"layer {layer!r} does not exist for site {site} of this {n}-block model: pass an integer from "
            f"{low} to {n}" + (" (0 = the embedding output)" if low == 0 else "")
        )
    if site != "resid_post":
        site_module(hf, int(layer), site)


def site_module(hf: HFModel, layer: int, site: str) -> tuple[str, Any]:
    """(qualified name, module) whose output is ``site`` at ``layer`` (attn_out / mlp_out)."""
    block = hf.blocks[layer - 1]
    for dotted in _SITE_MODULES[site]:
        module = block
        for part in dotted.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.Module):
            return f"{hf.blocks_name}.{layer - 1}.{dotted}", module
    raise AllocationError(
        f"block {layer} ({type(block).__name__}) has no {site} sub-module (looked for "
        f"{', '.join(_SITE_MODULES[site])}); use site=resid_post"
    )


def transformer_lens_hook(causal: bool, layer: int, site: str) -> str:
    """The TransformerLens name of a site (what SAELens cfgs call ``hook_name``).

    Causal LMs (HookedTransformer, pre-LN): ``blocks.{L-1}.hook_resid_post`` / ``hook_attn_out`` /
    ``hook_mlp_out``, layer 0 ``blocks.0.hook_resid_pre``. Encoders (HookedEncoder, post-LN BERT):
    the residual after block L is ``blocks.{L-1}.hook_normalized_resid_post``, layer 0 ``hook_full_embed``.
    """
    if site != "resid_post":
        return f"blocks.{layer - 1}.hook_{site}"
    if causal:
        return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"
    return "hook_full_embed" if layer == 0 else f"blocks.{layer - 1}.hook_normalized_resid_post"


def hook_name(hf: HFModel, layer: int, site: str) -> str:
    """The module (and side) the site hooks, e.g. 'transformer.h.2 (output)'."""
    if site == "resid_post":
        if layer == 0:
            return f"{hf.blocks_name}.0 (input)"
        return f"{hf.blocks_name}.{layer - 1} (output)"
    return f"{site_module(hf, layer, site)[0]} (output)"


@contextmanager
def hooked(hf: HFModel, layer: int, site: str, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Iterator[None]:
    """Within the block, ``fn(h)`` sees the site's activations h (batch, seq, d) on every forward and
    may return a replacement (same shape) or None (keep). Removed on exit."""
    check_site(hf, layer, site)

    def replace_output(module: Any, inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def replace_input(module: Any, args: Any, kwargs: Any) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    if site == "resid_post" and layer == 0:
        handle = hf.blocks[0].register_forward_pre_hook(replace_input, with_kwargs=True)
    elif site == "resid_post":
        handle = hf.blocks[layer - 1].register_forward_hook(replace_output)
    else:
        handle = site_module(hf, layer, site)[1].register_forward_hook(replace_output)
    try:
        yield
    finally:
        handle.remove()


def forward(hf: HFModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """One forward pass of the model (inference mode) on its device."""
    device = next(hf.model.parameters()).device
    return hf.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))


def capture(hf: HFModel, layer: int, site: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The site's activations (batch, seq, d) for one padded batch; the layers after it do not run."""
    captured: list = []

    def grab(hidden: torch.Tensor) -> None:
        captured.append(hidden.detach())
        raise _StopForward

    with torch.inference_mode(), hooked(hf, layer, site, grab):
        try:
            forward(hf, input_ids, attention_mask)
        except _StopForward:
            pass
    if not captured:
        raise AllocationError(f"internal: the {site} hook at layer {layer} never ran")
    return captured[0]


# --------------------------------------------------------------------------------------------------
# the corpus


def _is_dataset_dir(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def corpus_files(text: Path) -> list[Path]:
    """The text files of a corpus path (a file, or every .txt/.jsonl file under a directory)."""
    if text.is_file():
        return [text]
    files = sorted(p for p in text.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise AllocationError(
            f"corpus directory {str(text)!r} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files and "
            "is not a datasets save_to_disk directory; pass a text file, a .jsonl file or such a directory"
        )
    return files


def check_corpus(text: Any) -> Union[Path, list]:
    """A corpus spec as a resolved Path or a list of strings, or a clear error."""
    if isinstance(text, (list, tuple)):
        if not all(isinstance(t, str) for t in text):
            raise AllocationError("text as a list must hold strings (the documents)")
        return list(text)
    if not isinstance(text, (str, os.PathLike)):
        raise AllocationError(
            f"text must be a .txt/.jsonl file, a directory of them or a datasets save_to_disk directory "
            f"(or a list of strings), got {type(text).__name__}"
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise AllocationError(f"corpus {str(text)!r} does not exist; pass text=FILE_OR_DIR")
    if path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise AllocationError(
            f"corpus {str(path)!r} is not a text corpus (suffix {path.suffix or 'none'}): pass a "
            f"{'/'.join(TEXT_SUFFIXES)} file (documents separated by blank lines), a .jsonl file "
            "(one JSON object per line with a text field), a directory of them or a datasets directory"
        )
    if path.is_dir() and not _is_dataset_dir(path):
        corpus_files(path)
    return path.resolve()


def _read_text(path: Path) -> Iterator[str]:
    """Documents of a .txt file (separated by blank lines), streamed; non-UTF-8 bytes are an error."""
    paragraph: list[str] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise AllocationError(
                    f"corpus file {str(path)!r} is not UTF-8 text (line {number}: {error.reason}); pass a text file"
                ) from None
            if "\x00" in line:
                raise AllocationError(
                    f"corpus file {str(path)!r} is not a text file: it holds NUL bytes (line {number})"
                )
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise AllocationError(
                    f"corpus file {str(path)!r} line {number} is not a JSON object ({error}); a .jsonl corpus "
                    f'holds one object per line, e.g. {{"{text_field}": "..."}}'
                ) from None
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise AllocationError(
                    f"corpus file {str(path)!r} line {number} has no string field {text_field!r}; pass text_field=NAME"
                )
            if value.strip():
                yield value


def _read_dataset(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as error:
        raise AllocationError(
            f"corpus {str(path)!r} is a datasets save_to_disk directory; reading it needs the datasets package "
            "(pip install datasets)"
        ) from error
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:
        raise AllocationError(
            f"corpus {str(path)!r} could not be read with datasets.load_from_disk ({error})"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise AllocationError(f"corpus {str(path)!r} is a DatasetDict without a 'train' split ({list(dataset)})")
        dataset = dataset["train"]
    if text_field not in dataset.column_names:
        raise AllocationError(
            f"dataset {str(path)!r} has no column {text_field!r} (columns {dataset.column_names}); pass text_field=NAME"
        )
    for start in range(0, len(dataset), 1024):  # streamed from the memory-mapped arrow files
        for value in dataset[start : start + 1024][text_field]:
            if not isinstance(value, str):
                raise AllocationError(
                    f"dataset {str(path)!r} column {text_field!r} holds {type(value).__name__}, not text"
                )
            if value.strip():
                yield value


def iter_documents(corpus: Union[Path, list], text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of a corpus (from :func:`check_corpus`), in order, streamed."""
    if isinstance(corpus, list):
        yield from (t for t in corpus if t.strip())
        return
    if corpus.is_dir() and _is_dataset_dir(corpus):
        yield from _read_dataset(corpus, text_field)
        return
    for path in corpus_files(corpus):
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_text(path)


# --------------------------------------------------------------------------------------------------
# fingerprints


def _file_digest(path: Path, whole_bytes: int = 1 << 62) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= whole_bytes:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(handle.read(_EDGE_BYTES))
            handle.seek(size - _EDGE_BYTES)
            digest.update(handle.read(_EDGE_BYTES))
    return digest.hexdigest()


def model_fingerprint(path: Path) -> str:
    """sha256 over the model directory's files: small ones whole, large ones (weights) by size + edges."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(path)).encode() + b"\x00")
        digest.update(_file_digest(file, _WHOLE_FILE_BYTES).encode())
    return digest.hexdigest()


def corpus_fingerprint(corpus: Union[Path, list]) -> str:
    """sha256 of the corpus: the documents of a list, else every file's bytes (names included)."""
    digest = hashlib.sha256()
    if isinstance(corpus, list):
        for text in corpus:
            digest.update(text.encode("utf-8") + b"\x00")
        return digest.hexdigest()
    files = (
        sorted(p for p in corpus.rglob("*") if p.is_file())
        if corpus.is_dir() and _is_dataset_dir(corpus)
        else corpus_files(corpus)
    )
    root = corpus if corpus.is_dir() else corpus.parent
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\x00")
        digest.update(_file_digest(file).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# windows


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special token ids the tokenizer wraps a sequence in ([CLS] / [SEP], BOS, none)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    wrapped = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return list(wrapped[:start]), list(wrapped[start + len(plain) :])
    return [], []


def iter_windows(
    documents: Iterator[str],
    tokenizer: Any,
    n_tokens: int,
    max_length: int,
    keep_special_tokens: bool,
    prefix: Sequence[int],
    suffix: Sequence[int],
) -> Iterator[tuple[list[int], int, int]]:
    """Yield ``(input_ids, first, stop)`` per window: positions [first, stop) are its activation rows,
    in corpus order, until ``n_tokens`` rows (the last window is cut short). Stops early at n_tokens."""
    body = max_length - len(prefix) - len(suffix)
    remaining = n_tokens
    batch: list[str] = []

    def windows_of(texts: list[str]) -> Iterator[tuple[list[int], int, int]]:
        nonlocal remaining
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            for offset in range(0, len(ids), body):
                chunk = list(ids[offset : offset + body])
                extra = len(prefix) + len(suffix) if keep_special_tokens else 0
                if len(chunk) + extra > remaining:
                    chunk = chunk[: max(1, remaining - extra)]
                window = [*prefix, *chunk, *suffix]
                first, stop = (0, len(window)) if keep_special_tokens else (len(prefix), len(prefix) + len(chunk))
                stop = min(stop, first + remaining)
                remaining -= stop - first
                yield window, first, stop
                if remaining <= 0:
                    return

    for document in documents:
        batch.append(document)
        if len(batch) == 256:
            yield from windows_of(batch)
            batch = []
            if remaining <= 0:
                return
    if batch and remaining > 0:
        yield from windows_of(batch)


def padded(windows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (batch, width) input ids and attention mask."""
    width = max(len(w) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(list(window), dtype=torch.long)
        attention[row, : len(window)] = 1
    return input_ids, attention


def pad_id_of(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------------
# extraction


def extract(
    hf: HFModel,
    layer: int,
    site: str,
    windows: Iterator[tuple[list[int], int, int]],
    out: np.ndarray,
    tokens_out: np.ndarray,
    *,
    batch_size: int = 32,
    buffer_windows: int = 2048,
    progress: bool = False,
    desc: Optional[str] = None,
) -> int:
    """Write the site's activations of every window's rows into ``out`` (n, d) and per row
    ``(token id, window index)`` into ``tokens_out`` (n, 2), in corpus order; returns the rows written.

    Windows are buffered ``buffer_windows`` at a time and run in batches of similar length (padding
    is masked, so the values do not depend on the batching beyond float rounding).
    """
    from tqdm.auto import tqdm

    bar = tqdm(
        total=out.shape[0],
        unit="tok",
        desc=f"{desc or hf.path.name} {site}{layer}",
        disable=not progress,
        mininterval=1.0,
    )
    pad = pad_id_of(hf.tokenizer)
    written = 0
    n_windows = 0

    def flush(buffer: list) -> None:
        nonlocal written
        order = sorted(range(len(buffer)), key=lambda i: len(buffer[i][1]))
        for start in range(0, len(order), batch_size):
            members = [buffer[i] for i in order[start : start + batch_size]]
            input_ids, attention = padded([m[1] for m in members], pad)
            hidden = capture(hf, layer, site, input_ids, attention).float().cpu().numpy()
            for row, (offset, window, first, stop, index) in enumerate(members):
                out[offset : offset + stop - first] = hidden[row, first:stop]
                tokens_out[offset : offset + stop - first, 0] = window[first:stop]
                tokens_out[offset : offset + stop - first, 1] = index
                bar.update(stop - first)
        written += sum(m[3] - m[2] for m in buffer)

    buffer: list = []
    offset = 0
    try:
        for window, first, stop in windows:
            buffer.append((offset, window, first, stop, n_windows))
            offset += stop - first
            n_windows += 1
            if len(buffer) >= buffer_windows:
                flush(buffer)
                buffer = []
        if buffer:
            flush(buffer)
    finally:
        bar.close()
    return written


def default_cache_dir() -> Path:
    """``$ALLOCATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/allocation``, else ``~/.cache/allocation``."""
    if os.environ.get("ALLOCATION_CACHE_DIR"):
        return Path(os.environ["ALLOCATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "allocation"


def tokens_path(path: Path) -> Path:
    """The per-row (token id, window index) file beside an activation cache file."""
    return path.with_name(path.name + TOKENS_SUFFIX)


def read_tokens(path: Path) -> Optional[np.ndarray]:
    """The (n, 2) int32 token file of a cache file, or None when absent."""
    file = tokens_path(Path(path))
    if not file.exists():
        return None
    return np.memmap(file, dtype=np.int32, mode="r").reshape(-1, 2)


def _cache_location(model_path: Path, fingerprints: dict, layer: int, site: str, n_tokens: int, max_length: int,
                    keep_special_tokens: bool, text_field: str, dtype: str, model_dtype: str,
                    cache_dir: Optional[PathLike], cache_prefix: Optional[str]) -> tuple[Path, dict, str]:
    """The cache file of an extraction, its key fields and its key (sha256 of the fields).

    ``fingerprints``: {"model": model_fingerprint, "corpus": corpus_fingerprint}, hashed once per call.
    """
    key_fields = {
        **fingerprints,
        "layer": layer,
        "site": site,
        "n_tokens": n_tokens,
        "max_length": max_length,
        "keep_special_tokens": bool(keep_special_tokens),
        "text_field": text_field,
        "dtype": dtype,
        "model_dtype": model_dtype,
    }
    cache_key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = cache_prefix or f"hf-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in model_path.name)}"
    path = cache_dir / f"{stem}_{site}{layer}_{n_tokens}tok_len{max_length}_{cache_key[:16]}.{DTYPES[dtype]}"
    return path, key_fields, cache_key


def _cache_label(name: Optional[str], model_path: Path, site: str, layer: int, path: Path) -> str:
    return name or f"{model_path.name} {site} layer {layer} activations {str(path)!r}"


def _read_cache(path: Path, name: Optional[str], model_path: Path, site: str, layer: int,
                heldout_fraction: float) -> Optional[ArraySource]:
    """The cached activations at ``path`` (memory-mapped), or None when any of its three files is missing."""
    if not (path.exists() and sidecar_for(path).exists() and tokens_path(path).exists()):
        return None
    label = _cache_label(name, model_path, site, layer, path)
    array, sidecar = read_memmap(path, label)
    return ArraySource(array, heldout_fraction=heldout_fraction, name=label, metadata=sidecar)


def hf_activations(
    model: Optional[PathLike] = None,
    layer: Optional[int] = None,
    site: str = "resid_post",
    text: Any = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    *,
    max_length: Optional[int] = None,
    dtype: str = "float32",
    model_dtype: str = "float32",
    text_field: str = "text",
    keep_special_tokens: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
    cache_dir: Optional[PathLike] = None,
    heldout_fraction: float = 0.1,
    rebuild: bool = False,
    progress: bool = False,
    name: Optional[str] = None,
    model_name: Optional[str] = None,
    corpus_name: Optional[str] = None,
    cache_prefix: Optional[str] = None,
) -> ArraySource:
    """Activations (n_tokens, d_model) of ``model`` at ``site`` of ``layer`` over the corpus ``text``.

    Extracted once into the memory-mapped cache (see the module docstring), memory-mapped on every
    later call with the same inputs; ``rebuild=True`` extracts again. ``max_length``: tokens per window,
    special tokens included (default min(128, the model's positions)). ``dtype``: storage (float32 or
    float16); ``model_dtype``: what the model runs in. Raises AllocationError for a missing model
    directory, a layer/site the model lacks, an empty or non-text corpus, or a corpus with fewer than
    ``n_tokens`` tokens (the error says how many it holds).
    """
    if model is None:
        raise AllocationError("data='hf' needs model=PATH (a local transformers model directory)")
    model_path = check_model_dir(model)
    if text is None:
        raise AllocationError(
            "data='hf' needs text=FILE_OR_DIR (a .txt/.jsonl file, a directory of them or a "
            "datasets save_to_disk directory)"
        )
    n_tokens = positive_int(n_tokens, "n_tokens", allow_integral_float=False)
    if max_length is not None:
        max_length = positive_int(max_length, "max_length", allow_integral_float=False)
    batch_size = positive_int(batch_size, "batch_size", allow_integral_float=False)
    if dtype not in DTYPES:
        raise AllocationError(f"dtype must be one of {sorted(DTYPES)} (the cache's storage), got {dtype!r}")
    corpus = check_corpus(text)
    if model_dtype not in MODEL_DTYPES:
        raise AllocationError(f"model_dtype must be one of {MODEL_DTYPES}, got {model_dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise AllocationError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    fingerprints = {"model": model_fingerprint(model_path), "corpus": corpus_fingerprint(corpus)}
    location = dict(model_path=model_path, fingerprints=fingerprints, site=site, n_tokens=n_tokens,
                    keep_special_tokens=keep_special_tokens, text_field=text_field, dtype=dtype,
                    model_dtype=model_dtype, cache_dir=cache_dir, cache_prefix=cache_prefix)
    known = site in SITES and isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and layer >= 0
    if not rebuild and known and max_length is not None:
        # a cache is written only after the model passed the layer, site and max_length checks with these
        # inputs, so a hit needs neither the model (seconds to load) nor the checks
        path, _, _ = _cache_location(layer=int(layer), max_length=max_length, **location)
        cached = _read_cache(path, name, model_path, site, int(layer), heldout_fraction)
        if cached is not None:
            return cached
    hf = load_hf_model(model, model_dtype)
    if layer is None:
        layer = hf.n_layers // 2
    check_site(hf, layer, site)
    layer = int(layer)
    limit = getattr(hf.model.config, "max_position_embeddings", None) or getattr(hf.model.config, "n_positions", None)
    prefix, suffix = special_tokens(hf.tokenizer)
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if max_length <= len(prefix) + len(suffix) or (limit is not None and max_length > limit):
        raise AllocationError(
            f"max_length must be between {len(prefix) + len(suffix) + 1} and the model's "
            f"{limit} positions, got {max_length}"
        )
    try:
        hf.model.to(device)
    except (RuntimeError, TypeError) as error:
        raise AllocationError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from error

    path, key_fields, cache_key = _cache_location(layer=layer, max_length=max_length, **location)
    label = _cache_label(name, model_path, site, layer, path)
    if not rebuild:
        cached = _read_cache(path, name, model_path, site, layer, heldout_fraction)
        if cached is not None:
            return cached

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    temporary_tokens = path.with_name(f"{path.name}{TOKENS_SUFFIX}.tmp{os.getpid()}")
    described = corpus_name or _describe_corpus(corpus)
    started = time.perf_counter()
    # a tokenisation pass first (fast next to the model): a short or empty corpus fails before extracting
    available = sum(
        stop - first
        for _, first, stop in iter_windows(
            iter_documents(corpus, text_field), hf.tokenizer, n_tokens, max_length, keep_special_tokens, prefix, suffix
        )
    )
    if available == 0:
        raise AllocationError(f"the corpus {described} is empty: it holds no text to tokenise; pass a corpus with text")
    if available < n_tokens:
        raise AllocationError(
            f"n_tokens={n_tokens} is more than the {available} tokens the corpus {described} holds at "
            f"max_length={max_length}; pass n_tokens={available} or less, or a larger corpus"
        )
    try:
        out = np.memmap(temporary, dtype=np.dtype(dtype), mode="w+", shape=(n_tokens, hf.d_model))
        tokens_out = np.memmap(temporary_tokens, dtype=np.int32, mode="w+", shape=(n_tokens, 2))
        documents = _Counter(iter_documents(corpus, text_field))
        windows = iter_windows(documents, hf.tokenizer, n_tokens, max_length, keep_special_tokens, prefix, suffix)
        counter = _Counter(windows)
        written = extract(
            hf, layer, site, counter, out, tokens_out, batch_size=batch_size, progress=progress, desc=model_name
        )
        if written == 0:
            raise AllocationError(
                f"the corpus {described} is empty: it holds no text to tokenise; pass a corpus with text"
            )
        if written < n_tokens:
            raise AllocationError(
                f"n_tokens={n_tokens} is more than the {written} tokens the corpus {described} holds at "
                f"max_length={max_length}; pass n_tokens={written} or less, or a larger corpus"
            )
        out.flush()
        tokens_out.flush()
        del out, tokens_out
        os.replace(temporary_tokens, tokens_path(path))
        os.replace(temporary, path)
    finally:
        for leftover in (temporary, temporary_tokens):
            if leftover.exists():
                leftover.unlink()
    seconds = time.perf_counter() - started
    import transformers

    write_sidecar(
        path,
        shape=[n_tokens, hf.d_model],
        dtype=dtype,
        source="hf",
        model=model_name or name_of(hf),
        model_path=str(hf.path),
        model_kind=hf.kind,
        model_dtype=model_dtype,
        layer=layer,
        site=site,
        hook=hook_name(hf, layer, site),
        hook_name=transformer_lens_hook(hf.causal, layer, site),
        max_length=max_length,
        keep_special_tokens=bool(keep_special_tokens),
        special_prefix=prefix,
        special_suffix=suffix,
        pad_id=pad_id_of(hf.tokenizer),
        text_field=text_field,
        corpus=described,
        corpus_hash=key_fields["corpus"],
        model_hash=key_fields["model"],
        cache_key=cache_key,
        cache_path=str(path),
        tokens_file=tokens_path(path).name,
        n_windows=counter.count,
        corpus_documents=len(corpus) if isinstance(corpus, list) else None,
        documents_read=documents.count,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
        extraction_seconds=round(seconds, 2),
        tokens_per_second=round(n_tokens / max(seconds, 1e-9), 1),
    )
    array, sidecar = read_memmap(path, label)
    return ArraySource(array, heldout_fraction=heldout_fraction, name=label, metadata=sidecar)


def name_of(hf: HFModel) -> str:
    """The model's name: config._name_or_path when it is a hub-style name, else the directory name."""
    recorded = getattr(hf.model.config, "_name_or_path", "") or ""
    return recorded if recorded and not os.path.isabs(recorded) and not recorded.startswith(".") else hf.path.name


def _describe_corpus(corpus: Union[Path, list]) -> str:
    return f"<{len(corpus)} documents>" if isinstance(corpus, list) else repr(str(corpus))


class _Counter:
    """Counts the windows an iterator yields."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator, self.count = iterator, 0

    def __iter__(self) -> Iterator:
        for item in self.iterator:
            self.count += 1
            yield item
