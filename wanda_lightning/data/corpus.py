"""The built-in offline corpus: CPython's ``pydoc_data.topics`` text, cut into token windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["TokenSplits", "pydoc_text", "split_tokens", "token_windows"]


def pydoc_text() -> str:
    """CPython's own help topics (about 465k characters of English prose and code), present on every install.

    Example::

        >>> len(pydoc_text()) > 100_000
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


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
