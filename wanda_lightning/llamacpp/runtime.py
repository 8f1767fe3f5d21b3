"""llama.cpp through llama-cpp-python, imported only when used: whether it is installed, and a GGUF loaded on the CPU
with one thread per core.

llama-cpp-python is the optional extra ``wanda-lightning[llamacpp]``; its PyPI release is a source distribution that
builds llama.cpp with the machine's C++ compiler and cmake on install.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["CACHE_TYPES", "INSTALL_HINT", "default_threads", "import_llama_cpp", "is_available", "load_gguf"]

#: What to run when llama-cpp-python is missing.
INSTALL_HINT = (
    "pip install wanda-lightning[llamacpp] (llama-cpp-python, built from source with cmake and a C++ compiler)"
)

#: Key/value cache types :func:`load_gguf` takes: llama.cpp's default ``"f16"`` (what users run), or ``"f32"``
#: (no rounding of cached keys and values: llama.cpp's logits then match PyTorch's float32 ones to ~1e-5).
CACHE_TYPES: dict[str, str] = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32"}


def is_available() -> bool:
    """Whether llama-cpp-python can be imported.

    Example::

        >>> isinstance(is_available(), bool)
        True
    """
    try:
        import_llama_cpp()
    except ModuleNotFoundError:
        return False
    return True


def import_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module.

    Raises:
        ModuleNotFoundError: If llama-cpp-python is not installed, naming the extra that installs it.

    Example::

        llama_cpp = import_llama_cpp()
        print(llama_cpp.__version__)
    """
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as error:  # a missing package, or a build that cannot load its shared library
        raise ModuleNotFoundError(
            f"running a GGUF in llama.cpp needs llama-cpp-python: {INSTALL_HINT} ({error})"
        ) from (error)


def default_threads() -> int:
    """Threads llama.cpp runs on by default: one per core this process may use.

    Example::

        >>> default_threads() >= 1
        True
    """
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)  # pragma: no cover - not Linux


def load_gguf(
    path: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    threads: int | None = None,
    logits_all: bool = False,
    batch: int = 512,
    cache_type: str = "f16",
) -> Any:
    """Loads a GGUF into llama.cpp on the CPU, quietly.

    Args:
        path: The GGUF file.
        n_ctx: Context length (tokens the key/value cache holds).
        threads: Threads for single-token and batched evaluation; ``None``: :func:`default_threads`.
        logits_all: Keep the logits of every evaluated token (``llama.scores``), as perplexity needs; otherwise only
            the last token's are computed.
        batch: Most tokens evaluated in one ``decode`` call (a longer ``eval`` is split).
        cache_type: Type of the cached keys and values, one of :data:`CACHE_TYPES` (default ``"f16"``, llama.cpp's).

    Returns:
        A ``llama_cpp.Llama``; call ``.close()`` when done with it.

    Raises:
        ModuleNotFoundError: If llama-cpp-python is not installed.
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If ``threads``, ``n_ctx`` or ``batch`` is not a positive integer, ``cache_type`` is unknown, or
            llama.cpp cannot load the file (its reason is in llama.cpp's log, printed to stderr with ``verbose=True``).

    Example::

        llama = load_gguf("model.gguf", n_ctx=256, logits_all=True)
    """
    for name, value in (("n_ctx", n_ctx), ("batch", batch), ("threads", threads)):
        if value is None and name == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"`cache_type` must be one of {list(CACHE_TYPES)}, got {cache_type!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"`path` {str(path)!r} is not a GGUF file")
    llama_cpp = import_llama_cpp()
    count = threads or default_threads()
    cache = int(getattr(llama_cpp, CACHE_TYPES[cache_type]))
    return llama_cpp.Llama(
        model_path=str(file),
        n_ctx=n_ctx,
        n_batch=min(batch, n_ctx),
        n_ubatch=min(batch, n_ctx),
        n_threads=count,
        n_threads_batch=count,
        n_gpu_layers=0,
        logits_all=logits_all,
        type_k=cache,
        type_v=cache,
        verbose=False,
    )
