"""Masks read back from the weights themselves, for processes that hold only pieces of each weight (FSDP1's flat
shards, FSDP2's row shards) or that resume without saved masks: a pruned weight is exactly zero."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .sharding import is_dtensor

__all__ = ["kept_from_nonzeros"]


def kept_from_nonzeros(layers: Iterable[Any]) -> dict[str, Tensor]:
    """Keep masks (True where a weight is kept) by parameter name, read from the target layers' weights as this
    process holds them (its shard under FSDP): a kept weight that happens to be exactly 0 then counts as pruned.

    Args:
        layers: Target layers (:class:`~wanda_lightning.core.target_layer.TargetLayer`: ``parameter_name``,
            ``tensor``).

    Example::

        >>> import torch
        >>> from types import SimpleNamespace
        >>> layer = SimpleNamespace(parameter_name="0.weight", tensor=torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> kept_from_nonzeros([layer])["0.weight"].tolist()
        [[False, True], [True, False]]
    """
    masks = {}
    for layer in layers:
        weight = layer.tensor.detach()
        masks[layer.parameter_name] = (weight.to_local() if is_dtensor(weight) else weight) != 0
    return masks
