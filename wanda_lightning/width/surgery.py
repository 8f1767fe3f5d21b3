"""Removing channels from Linear and Conv1D layers in place, and resizing layers to a checkpoint's shapes.

Each layer keeps its identity (its name, parent and hooks stay valid); its weight (and bias) become new parameters
with the same dtype, device and ``requires_grad``, so an optimizer holding the old ones must be rebuilt.

transformers 5's ``prune_linear_layer`` builds a new float32 layer (it would change a bfloat16 model's dtype) and no
longer has a Conv1D variant; Torch-Pruning's in-place pruners cover ``nn.Linear`` but not transformers' Conv1D, and
reset ``requires_grad``. The handful of lines below do what both need, for both layer kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn

from ..core.layers import is_conv1d, is_linear_layer
from .groups import UnitGroup

__all__ = ["add_to_bias", "fit_to_state_dict", "keep_inputs", "keep_outputs", "remove_units"]


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = cast(Tensor, getattr(module, name))
    setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))


def _set_sizes(module: nn.Module) -> None:
    weight = cast(Tensor, module.weight)
    rows, columns = int(weight.shape[0]), int(weight.shape[1])
    sizes = {"nx": rows, "nf": columns} if is_conv1d(module) else {"out_features": rows, "in_features": columns}
    for name, value in sizes.items():
        setattr(module, name, value)


def keep_outputs(module: nn.Module, index: Tensor) -> None:
    """Keeps only the output channels ``index`` (in that order) of a Linear or Conv1D layer, bias included.

    Example::

        >>> layer = nn.Linear(2, 3)
        >>> keep_outputs(layer, torch.tensor([0, 2]))
        >>> layer.weight.shape, layer.out_features
        (torch.Size([2, 2]), 2)
    """
    weight = cast(Tensor, module.weight)
    dim = 1 if is_conv1d(module) else 0
    _replace(module, "weight", weight.index_select(dim, index.to(weight.device)))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        _replace(module, "bias", bias.index_select(0, index.to(bias.device)))
    _set_sizes(module)


def keep_inputs(module: nn.Module, index: Tensor) -> None:
    """Keeps only the input channels ``index`` (in that order) of a Linear or Conv1D layer.

    Example::

        >>> layer = nn.Linear(3, 2)
        >>> keep_inputs(layer, torch.tensor([1]))
        >>> layer.weight.shape, layer.in_features
        (torch.Size([2, 1]), 1)
    """
    weight = cast(Tensor, module.weight)
    dim = 0 if is_conv1d(module) else 1
    _replace(module, "weight", weight.index_select(dim, index.to(weight.device)))
    _set_sizes(module)


def add_to_bias(module: nn.Module, delta: Tensor | None = None) -> None:
    """Adds ``delta`` (``(out_features,)``, computed in float32) to a layer's bias, creating a zero bias (same dtype,
    device and ``requires_grad`` as the weight) when it has none; ``delta=None`` only makes sure the bias exists.

    Example::

        >>> layer = nn.Linear(2, 2, bias=False)
        >>> add_to_bias(layer, torch.tensor([1.0, 2.0]))
        >>> layer.bias.tolist()
        [1.0, 2.0]
    """
    weight = cast(Tensor, module.weight)
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor):
        channels = weight.shape[1] if is_conv1d(module) else weight.shape[0]
        module.bias = nn.Parameter(
            torch.zeros(channels, dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad
        )
        bias = cast(Tensor, module.bias)
    if delta is not None:
        with torch.no_grad():
            bias.copy_((bias.float() + delta.to(bias.device, torch.float32)).to(bias.dtype))


def remove_units(group: UnitGroup, keep: Tensor) -> None:
    """Keeps only the units ``keep`` (sorted unit indices) of a group: the producers' output rows and the consumer's
    input columns they own."""
    for member in group.producers:
        keep_outputs(member.module, member.channels(keep))
    keep_inputs(group.consumer.module, group.consumer.channels(keep))
    group.num_units = int(keep.numel())


def fit_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """Resizes every Linear and Conv1D layer of ``model`` whose weight in ``state_dict`` has another shape (a
    width-pruned checkpoint loaded into a model built at its original size), and gives a bias to layers whose
    checkpoint has one.

    The resized layers hold uninitialised values until the state dict is loaded. Returns the resized layers' names.

    Args:
        model: The model (or a LightningModule holding it).
        state_dict: The checkpoint's state dict.
        prefix: Prefix of ``model``'s names in ``state_dict``.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> small = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "2.weight": torch.zeros(4, 5)}
        >>> fit_to_state_dict(net, small)
        ['0', '2']
        >>> net.load_state_dict({**small, "2.bias": torch.zeros(4)}) and net[0].out_features
        5
    """
    resized: list[str] = []
    for name, module in model.named_modules():
        if not is_linear_layer(module):
            continue
        key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
        stored = state_dict.get(key)
        weight = cast(Tensor, module.weight)
        changed = False
        if isinstance(stored, Tensor) and tuple(stored.shape) != tuple(weight.shape):
            _replace(module, "weight", torch.empty(stored.shape, dtype=weight.dtype, device=weight.device))
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                channels = stored.shape[1] if is_conv1d(module) else stored.shape[0]
                _replace(module, "bias", torch.empty(channels, dtype=bias.dtype, device=bias.device))
            _set_sizes(module)
            changed = True
        if f"{key.removesuffix('weight')}bias" in state_dict and not isinstance(getattr(module, "bias", None), Tensor):
            add_to_bias(module)
            changed = True
        if changed:
            resized.append(name)
    return resized
