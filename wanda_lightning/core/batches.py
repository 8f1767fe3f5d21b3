"""Calibration batches: bounding by sample count, re-batching, moving to a device, and feeding them to a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ForwardFn", "batch_size_of", "default_forward", "move_to", "prepare_batches", "token_mask_of"]

ForwardFn = Callable[[nn.Module, Any], Any]


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Applies ``fn`` to every tensor inside nested tuples (named ones too), lists and mappings (subclasses such as
    transformers' ``BatchEncoding`` kept); everything else is returned as is.

    Example::

        >>> map_tensors({"x": (torch.ones(1), 2)}, lambda t: 2 * t)
        {'x': (tensor([2.]), 2)}
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in obj.items()}
        return mapped if type(obj) is dict else type(obj)(mapped)  # type: ignore[call-arg]
    return obj


def move_to(obj: Any, device: torch.device | None) -> Any:
    """Moves every tensor inside nested tuples, lists and mappings to ``device`` (``None``: unchanged)."""
    if device is None:
        return obj
    return map_tensors(obj, lambda tensor: tensor.to(device, non_blocking=True))
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device) for v in obj)
    if isinstance(obj, Mapping):
        moved = {k: move_to(v, device) for k, v in obj.items()}
        # Keep mapping subclasses such as transformers' BatchEncoding.
        return moved if type(obj) is dict else type(obj)(moved)
    return obj


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), Tensor):
            return batch["input_ids"]
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        values = batch
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size_of(batch: Any) -> int:
    """Number of sequences in a batch: dim 0 of its ``input_ids`` or of its first tensor.

    Example::

        >>> batch_size_of({"input_ids": torch.zeros(3, 8, dtype=torch.long)})
        3
    """
    tensor = _first_tensor(batch)
    if tensor is None:
        raise TypeError(f"a calibration batch must hold at least one tensor, got {type(batch).__name__}")
    return int(tensor.shape[0]) if tensor.dim() > 0 else 1


def token_mask_of(batch: Any) -> Tensor | None:
    """The ``(batch, seq)`` boolean mask of real tokens, from a mapping batch's 2-D ``attention_mask``."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def _slice(batch: Any, start: int, stop: int, size: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop, size) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, start, stop, size) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop, size) for v in batch)
    return batch


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        if first.dim() == 0:
            return first
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot re-batch calibration sequences of different shapes {sorted(shapes)}: pad them to one length "
                "in the dataloader, or pass batch_size=None to use its batches as they are"
            )
        return torch.cat(parts, dim=0)
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat([p[i] for p in parts]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def prepare_batches(calibration: Iterable[Any], num_samples: int | None, batch_size: int | None) -> list[Any]:
    """Materialises at most ``num_samples`` sequences of ``calibration`` as batches of ``batch_size``.

    Args:
        calibration: Iterable of batches (tensors, tuples/lists, mappings) or a ``DataLoader``.
        num_samples: Bound on sequences used; ``None`` uses everything.
        batch_size: Sequences per batch; ``None`` keeps the iterable's own batches (the last one cut to fit).

    Returns:
        The batches, in order, still on the device they came on.

    Raises:
        ValueError: If the iterable yields no batch.

    Example::

        >>> [b.shape[0] for b in prepare_batches([torch.zeros(3, 4)] * 3, num_samples=7, batch_size=2)]
        [2, 2, 2, 1]
    """
    batches: list[Any] = []
    pending: list[Any] = []
    pending_size = 0
    taken = 0
    for batch in _iterate(calibration):
        size = batch_size_of(batch)
        if num_samples is not None and taken + size > num_samples:
            batch, size = _slice(batch, 0, num_samples - taken, size), num_samples - taken
        if size == 0:
            break
        taken += size
        if batch_size is None:
            batches.append(batch)
        else:
            start = 0
            while start < size:
                stop = min(size, start + batch_size - pending_size)
                pending.append(_slice(batch, start, stop, size) if (start, stop) != (0, size) else batch)
                pending_size += stop - start
                start = stop
                if pending_size == batch_size:
                    batches.append(pending[0] if len(pending) == 1 else _concat(pending))
                    pending, pending_size = [], 0
        if num_samples is not None and taken >= num_samples:
            break
    if pending:
        batches.append(pending[0] if len(pending) == 1 else _concat(pending))
    if not batches:
        raise ValueError("`calibration` yielded no batch: pass a non-empty iterable or DataLoader of batches")
    return batches


def _iterate(calibration: Iterable[Any]) -> Iterator[Any]:
    if isinstance(calibration, (Tensor, Mapping)):
        # A single tensor or mapping is one batch, not an iterable of rows or keys.
        yield calibration
        return
    try:
        iterator = iter(calibration)
    except TypeError:
        raise TypeError(
            f"`calibration` must be an iterable of batches or a DataLoader, got {type(calibration).__name__}"
        ) from None
    yield from iterator


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feeds a batch the way most models take it.

    A mapping is passed as ``model(**batch)``, a tuple or list as ``model(batch[0])`` and a tensor as ``model(batch)``.
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def input_device(model: nn.Module) -> torch.device | None:
    """The device a model's inputs should be on: its input embedding's, else its first parameter's."""
    get_input = getattr(model, "get_input_embeddings", None)
    if callable(get_input):
        try:
            embedding = get_input()
            if embedding is not None and getattr(embedding, "weight", None) is not None:
                return embedding.weight.device
        except (NotImplementedError, AttributeError):
            pass
    for parameter in model.parameters():
        return parameter.device
    return None
