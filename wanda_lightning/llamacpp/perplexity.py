"""Held-out perplexity of a GGUF computed by llama.cpp itself, on the same token windows PyTorch scores.

Every window is evaluated on its own, from an empty key/value cache, in one ``eval`` with the logits of every position
kept; the next-token negative log-likelihood comes from a float64 log-softmax of llama.cpp's float32 logits and is
summed over all predicted tokens of all windows (``seqlen - 1`` per window), exactly the definition of
:func:`wanda_lightning.data.evaluation.perplexity`, so the two numbers compare directly. No BOS token is added: the
windows are scored as given.

llama.cpp keeps its key/value cache in float16 by default, which alone moves a float32 model's logits by ~1e-2 (and
its perplexity by ~1e-4 relative) from PyTorch's; with ``cache_type="f32"`` an f32 GGUF's logits match PyTorch's to
~1e-5.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .runtime import load_gguf

__all__ = ["gguf_perplexity", "window_nll"]


def window_nll(logits: np.ndarray | Tensor, tokens: Sequence[int] | Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one window from its logits, in float64.

    Args:
        logits: ``(seqlen, vocab)`` logits; row ``t`` predicts token ``t + 1``.
        tokens: The window's ``seqlen`` token ids.

    Returns:
        ``(nll_sum, predicted_tokens)`` with ``predicted_tokens = seqlen - 1``.

    Raises:
        ValueError: If the shapes disagree or a token id lies outside the vocabulary.

    Example::

        >>> nll, count = window_nll(np.zeros((3, 4), dtype=np.float32), [0, 1, 2])
        >>> round(nll / count, 6) == round(math.log(4), 6), count
        (True, 2)
    """
    scores = torch.as_tensor(np.asarray(logits)).to(torch.float64)  # (T, V)
    ids = torch.as_tensor(tokens, dtype=torch.int64).flatten()  # (T,)
    if scores.ndim != 2 or scores.shape[0] != ids.numel():
        raise ValueError(f"`logits` must be (seqlen, vocab) with seqlen = {ids.numel()}, got {tuple(scores.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= scores.shape[1]):
        raise ValueError(f"token ids must lie in [0, {scores.shape[1]}), got {int(ids.min())}..{int(ids.max())}")
    if ids.numel() < 2:
        return 0.0, 0
    log_probs = torch.log_softmax(scores[:-1], dim=-1)  # (T - 1, V)
    nll = -log_probs.gather(1, ids[1:, None]).sum()
    return float(nll), ids.numel() - 1


def gguf_perplexity(
    path: str | os.PathLike[str] | Any,
    windows: Tensor | Sequence[Sequence[int]],
    *,
    threads: int | None = None,
    cache_type: str = "f16",
) -> float:
    """Perplexity of a GGUF in llama.cpp over non-overlapping token windows (see the module docstring).

    Args:
        path: The GGUF file, or a ``llama_cpp.Llama`` loaded with ``logits_all=True`` and a context at least as long
            as a window.
        windows: ``(num_windows, seqlen)`` token ids (a tensor or lists), e.g. from
            :func:`wanda_lightning.data.corpus.token_windows`.
        threads: llama.cpp threads; ``None``: one per core.
        cache_type: Key/value cache type when loading from a path: ``"f16"`` (llama.cpp's default, what users run) or
            ``"f32"`` (no rounding of cached keys and values, to check a file's exactness against PyTorch's float32).

    Returns:
        ``exp(mean NLL)`` over every predicted token.

    Raises:
        ModuleNotFoundError: If llama-cpp-python is not installed.
        ValueError: If ``windows`` is empty or holds a window shorter than 2 tokens, or a token id lies outside the
            GGUF's vocabulary.

    Example::

        windows = token_windows(ids, 256)[:32]
        print(gguf_perplexity("small.q8_0.gguf", windows), perplexity(model, windows))
    """
    if isinstance(windows, Tensor) and windows.ndim != 2:
        raise ValueError(f"`windows` must be (num_windows, seqlen) token ids, got shape {tuple(windows.shape)}")
    rows = [[int(t) for t in window] for window in (windows.tolist() if isinstance(windows, Tensor) else windows)]
    if not rows or min(len(r) for r in rows) < 2:
        raise ValueError(f"`windows` must hold at least one window of 2 or more tokens, got {len(rows)} windows")
    longest = max(len(r) for r in rows)
    owned = isinstance(path, (str, os.PathLike))
    llama: Any = (
        load_gguf(path, n_ctx=longest, threads=threads, logits_all=True, batch=longest, cache_type=cache_type)
        if owned
        else path
    )
    try:
        vocab = int(llama.n_vocab())
        total, count = 0.0, 0
        for row in rows:
            if min(row) < 0 or max(row) >= vocab:
                raise ValueError(
                    f"token ids must lie in [0, {vocab}) (the GGUF's vocabulary), got {min(row)}..{max(row)}"
                )
            llama.reset()
            llama.eval(row)  # an empty cache first: eval drops every cached position from n_tokens = 0 on
            nll, tokens = window_nll(llama.scores[: len(row)], row)
            total += nll
            count += tokens
    finally:
        if owned:
            llama.close()
    return math.exp(total / count)
