"""The built-in offline corpora, cut into token windows: CPython's ``pydoc_data.topics`` text (calibration and
held-out perplexity), and the standard library's own docstrings (more distinct text to distil on)."""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["TokenSplits", "docstring_text", "pydoc_text", "split_tokens", "token_windows"]

#: Standard-library folders whose docstrings :func:`docstring_text` leaves out: ``pydoc_data`` (that is
#: :func:`pydoc_text`, the held-out text), tests, and bundled third-party or demo code.
_SKIPPED = frozenset(
    {"pydoc_data", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages"}
)


def pydoc_text() -> str:
    """CPython's own help topics (about 465k characters of English prose and code), present on every install.

    Example::

        >>> len(pydoc_text()) > 100_000
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def docstring_text(min_chars: int = 200) -> str:
    """The docstrings of CPython's standard library (about 1.2M characters on 3.11), present on every install.

    Read with :mod:`ast` from the source files, nothing is imported. It shares almost no text with
    :func:`pydoc_text` (0.2 % of its 12-word runs occur there), so it can feed a distillation that is evaluated on
    pydoc without recycling the same windows: the teacher provides the targets, any text serves.

    Args:
        min_chars: Shorter docstrings (one-line summaries) are left out.

    Example::

        >>> text = docstring_text()
        >>> len(text) > 500_000
        True
    """
    return _docstrings(sysconfig.get_paths()["stdlib"], min_chars)


@functools.lru_cache(maxsize=4)
def _docstrings(stdlib: str, min_chars: int) -> str:
    """:func:`docstring_text` of the standard library at ``stdlib``, parsed once per process."""
    parts: list[str] = []
    for path in _stdlib_sources(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file of another Python version or encoding
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc is not None and len(doc) >= min_chars:
                    parts.append(doc)
    return "\n\n".join(parts)


def _stdlib_sources(stdlib: str) -> list[Path]:
    """The ``.py`` files under ``stdlib``, sorted, without the :data:`_SKIPPED` folders (not even walked)."""
    sources: list[Path] = []
    for folder, children, files in os.walk(stdlib):
        children[:] = sorted(child for child in children if child not in _SKIPPED and child != "__pycache__")
        sources.extend(Path(folder, name) for name in sorted(files) if name.endswith(".py"))
    return sources


def token_windows(ids: Tensor, seqlen: int, count: int | None = None) -> Tensor:
    """Non-overlapping ``(count, seqlen)`` windows from the start of a 1-D token tensor (the tail is dropped).

    Raises:
        ValueError: If ``ids`` holds fewer than ``seqlen`` tokens or fewer than ``count`` windows.

    Example::

        >>> import torch
        >>> token_windows(torch.arange(10), 4).tolist()
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    available = ids.numel() // seqlen
    if available == 0 or (count is not None and count > available):
        raise ValueError(
            f"{ids.numel()} tokens give {available} windows of {seqlen}; {count or 1} requested: use more text, a "
            "smaller `seqlen` or fewer samples"
        )
    count = available if count is None else count
    return ids[: count * seqlen].reshape(count, seqlen)


@dataclass
class TokenSplits:
    """Calibration and held-out token windows from one text.

    Attributes:
        calibration: ``(num_samples, seqlen)`` windows from the first ``train_fraction`` of the tokens.
        heldout: ``(num_windows, eval_seqlen)`` non-overlapping windows from the rest.
    """

    calibration: Tensor
    heldout: Tensor


def split_tokens(
    tokenizer: Any,
    text: str | None = None,
    *,
    num_samples: int = 16,
    seqlen: int = 256,
    eval_seqlen: int | None = None,
    max_eval_windows: int | None = None,
    train_fraction: float = 0.7,
) -> TokenSplits:
    """Tokenises ``text`` (default: :func:`pydoc_text`) and splits it into calibration and held-out windows.

    Calibration windows are consecutive, non-overlapping ``seqlen`` windows from the start of the first
    ``train_fraction`` of the tokens; held-out windows tile the rest.

    Example::

        splits = split_tokens(tokenizer, num_samples=16, seqlen=256)
        splits.calibration.shape  # torch.Size([16, 256])
    """
    ids = tokenizer(text if text is not None else pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * train_fraction)
    heldout = token_windows(ids[cut:], eval_seqlen or seqlen)
    if max_eval_windows is not None:
        heldout = heldout[:max_eval_windows]
    return TokenSplits(calibration=token_windows(ids[:cut], seqlen, num_samples), heldout=heldout)
