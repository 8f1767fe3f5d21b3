"""Lightning checkpoints (and plain saved state dicts) in and out of the export format, read with
``torch.load(weights_only=True)`` so that no arbitrary code runs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .directory import DEFAULT_MAX_SHARD_SIZE, save_compressed
from .format import DEFAULT_MIN_SPARSITY
from .manifest import ExportSummary

__all__ = ["compress_checkpoint", "read_checkpoint"]


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def compress_checkpoint(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportSummary:
    """Compresses a Lightning ``.ckpt`` (or a plain saved state dict) into an export directory.

    The checkpoint is read with ``torch.load(weights_only=True)``: no arbitrary code runs. Its ``"state_dict"`` is
    exported; hyper-parameters that are plain JSON go into the manifest's metadata. Read it back with
    :func:`load_compressed`.

    Args:
        checkpoint: A ``.ckpt`` file from ``Trainer.save_checkpoint`` / ``ModelCheckpoint``, or a ``torch.save``-d
            state dict.
        path: The export directory to create.
        dtype: Cast floating-point tensors to this dtype.
        min_sparsity: See :func:`save_compressed`.
        overwrite: Replace ``path`` if it exists and is not empty.
        max_shard_size: See :func:`save_compressed`.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        FileNotFoundError: If ``checkpoint`` does not exist.
        ValueError: If it cannot be read with ``weights_only=True`` or holds no state dict.

    Example::

        compress_checkpoint("epoch=3.ckpt", "pruned-export/")
        state_dict, _ = load_compressed("pruned-export/")
        model.load_state_dict(state_dict)
    """
    state_dict, info = read_checkpoint(checkpoint)
    return save_compressed(
        state_dict,
        path,
        dtype=dtype,
        min_sparsity=min_sparsity,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        metadata={"source": info},
    )


def read_checkpoint(checkpoint: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads a Lightning checkpoint's state dict safely (``weights_only=True``), with JSON-safe details.

    Returns:
        ``(state_dict, info)`` where ``info`` has the kind, file name, JSON-safe hyper-parameters, epoch and step.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a checkpoint loadable with ``weights_only=True`` or holds no tensors.

    Example::

        state_dict, info = read_checkpoint("epoch=3.ckpt")
    """
    file = Path(checkpoint)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(file)!r} does not exist")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for non-checkpoints
        raise ValueError(
            f"checkpoint {str(file)!r} cannot be read with torch.load(weights_only=True): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        state_dict = dict(loaded["state_dict"])
        kind = "lightning-checkpoint"
    elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        state_dict, kind = dict(loaded), "state-dict"
    else:
        raise ValueError(
            f"checkpoint {str(file)!r} holds neither a Lightning checkpoint (a dict with 'state_dict') nor a state "
            f"dict of tensors; got {type(loaded).__name__}"
        )
    info = {
        "kind": kind,
        "file": file.name,
        "hyper_parameters": _json_safe(loaded.get("hyper_parameters")) if kind == "lightning-checkpoint" else None,
        "epoch": _json_safe(loaded.get("epoch")),
        "global_step": _json_safe(loaded.get("global_step")),
    }
    return state_dict, info
