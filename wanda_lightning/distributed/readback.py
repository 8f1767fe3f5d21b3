"""Masks read back from the weights themselves, for processes that hold only pieces of each weight (FSDP1's flat
shards, FSDP2's row shards) or that resume without saved masks: a pruned weight is exactly zero."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..core.layers import local_tensor
from ..core.targets import find_targets

__all__ = ["drop_masks_from_zeros"]


def drop_masks_from_zeros(
    model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str] | None
) -> dict[str, Tensor]:
    """Drop masks (True where a weight is pruned) by parameter name, read from the zeros of the target weights as this
    process holds them (its shard under FSDP); a kept weight that happens to be exactly 0 then counts as pruned.

    Example::

        >>> import torch
        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> drop_masks_from_zeros(net, None, None)["0.weight"].tolist()
        [[True, False], [False, True]]
    """
    layers, _ = find_targets(model, targets, ignore)
    return {layer.parameter_name: local_tensor(layer.tensor.detach()) == 0 for layer in layers}
