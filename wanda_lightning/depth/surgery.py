"""Removing whole blocks from a block stack, and the config that describes the shorter model.

The kept blocks are the same module objects, in the same order, so the shorter model computes exactly what the
original computes with the removed blocks skipped. What a family numbers by layer is renumbered: every attention
module's ``layer_idx`` (the KV cache's slot), ``num_hidden_layers`` and the per-layer lists of the config
(``layer_types``), so ``generate`` with a cache and a stock ``from_pretrained`` of the saved folder work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.blocks import BlockStack
from ..core.layers import describe_family

__all__ = ["PER_LAYER_KEYS", "check_removable", "remove_blocks"]

#: Config entries with one value per block, filtered with the blocks.
PER_LAYER_KEYS = ("layer_types",)
#: Config flags under which a block computes differently at another depth (a stock load would renumber it).
_DEPTH_DEPENDENT_FLAGS = {
    "scale_attn_by_inverse_layer_idx": "scales each block's attention by 1 / (its index + 1)",
}


def _container(model: nn.Module, stack: BlockStack) -> nn.Module:
    container = model.get_submodule(stack.name) if stack.name else model
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"the block stack `{stack.name}` is a {type(container).__name__}, not a list of blocks")
    return container


def check_removable(model: nn.Module, stack: BlockStack, config: Any | None) -> None:
    """Raises ``ValueError`` (the model untouched) when blocks of ``stack`` cannot be removed so that the shorter
    model is what the config describes: a stack that is not a list of blocks, a config whose layer count is not the
    stack's, a depth-dependent computation, an encoder-decoder, or a per-layer config list this library does not know.

    Example::

        >>> from wanda_lightning.core.blocks import BlockStack
        >>> net = nn.Module()
        >>> net.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
        >>> check_removable(net, BlockStack("layers", list(net.layers)), None)  # nothing to refuse
        >>> check_removable(net.layers, BlockStack("", list(net.layers)), None)
        Traceback (most recent call last):
        ...
        ValueError: the block stack is the model itself; depth pruning needs a model that holds its blocks
    """
    _container(model, stack)
    if stack.name == "":
        raise ValueError("the block stack is the model itself; depth pruning needs a model that holds its blocks")
    if config is None:
        return
    family = describe_family(config)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"the {family} config is an encoder-decoder; depth pruning handles decoder-only stacks")
    count = len(stack.blocks)
    layers = getattr(config, "num_hidden_layers", None)
    if layers != count:
        raise ValueError(
            f"the {family} config says {layers} hidden layers and the block stack `{stack.name}` has {count}: the "
            "shorter model could not be described; name the decoder layers with `blocks`"
        )
    values = config.to_dict()
    for flag, why in _DEPTH_DEPENDENT_FLAGS.items():
        if values.get(flag):
            raise ValueError(
                f"the {family} config sets `{flag}`, which {why}: a block moved to another index would compute "
                "differently once saved and loaded; depth pruning is refused for it"
            )
    for key, value in values.items():
        if isinstance(value, (list, tuple)) and len(value) == count and key not in PER_LAYER_KEYS:
            raise ValueError(
                f"the {family} config entry `{key}` has one value per layer, which this library does not know how "
                f"to shorten (known: {list(PER_LAYER_KEYS)}); depth pruning is refused for it"
            )


def remove_blocks(model: nn.Module, stack: BlockStack, removed: Sequence[int], config: Any | None) -> dict[str, Any]:
    """Removes blocks ``removed`` (indices into ``stack``) from ``model`` in place; renumbers the kept blocks'
    ``layer_idx``; rewrites ``config`` (when given) and returns what was rewritten.

    Run :func:`check_removable` first.

    Example::

        >>> from wanda_lightning.core.blocks import BlockStack
        >>> net = nn.Module()
        >>> net.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
        >>> keep = net.layers[2]
        >>> remove_blocks(net, BlockStack("layers", list(net.layers)), [0, 1], None)
        {}
        >>> len(net.layers), net.layers[0] is keep
        (1, True)
    """
    container = _container(model, stack)
    gone = set(removed)
    if not gone or not gone <= set(range(len(stack.blocks))) or len(gone) == len(stack.blocks):
        raise ValueError(f"cannot remove blocks {sorted(gone)} of {len(stack.blocks)}")
    pairs = zip(stack.keys, stack.blocks, strict=True)
    kept = [(key, block) for index, (key, block) in enumerate(pairs) if index not in gone]
    if isinstance(container, nn.ModuleList):
        shorter: nn.Module = nn.ModuleList(block for _, block in kept)
    elif all(key.isdigit() for key, _ in kept):
        shorter = nn.Sequential(*(block for _, block in kept))
    else:
        shorter = nn.Sequential(OrderedDict(kept))
    parent_name, _, attribute = stack.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    shorter.train(container.training)
    setattr(parent, attribute, shorter)
    for index, (_, block) in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", index)  # noqa: B010 - a plain attribute, not a submodule
    if config is None:
        return {}
    updates: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            updates[key] = [entry for index, entry in enumerate(value) if index not in gone]
    for key, value in updates.items():
        setattr(config, key, value)
    return updates
