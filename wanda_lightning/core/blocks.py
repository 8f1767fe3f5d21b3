"""Finding the stack of repeated blocks (decoder layers) that block-sequential calibration walks through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from .target_layer import TargetLayer

__all__ = ["BlockStack", "find_block_stack"]


@dataclass
class BlockStack:
    """An ordered container of repeated blocks.

    Attributes:
        name: Module name of the container (``"model.layers"``, ``"transformer.h"``, ...).
        blocks: The blocks, in execution order.
        keys: Their names in the container: ``"0"``, ``"1"``, ... (the default), or the names of an
            ``nn.Sequential`` built from an ``OrderedDict`` (torchvision's ViT: ``"encoder_layer_0"``, ...).
    """

    name: str
    blocks: list[nn.Module]
    keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [str(index) for index in range(len(self.blocks))]
        self._index = {key: index for index, key in enumerate(self.keys)}

    def block_name(self, index: int) -> str:
        return f"{self.name}.{self.keys[index]}" if self.name else self.keys[index]

    def index_of(self, layer_name: str) -> int | None:
        """Index of the block holding ``layer_name``, or ``None`` when it lies outside the stack."""
        prefix = f"{self.name}." if self.name else ""
        if not layer_name.startswith(prefix):
            return None
        head = layer_name[len(prefix) :].split(".", 1)[0]
        return self._index.get(head)


def _stack(name: str, module: nn.Module) -> BlockStack:
    keys, blocks = zip(*module.named_children(), strict=True)
    return BlockStack(name=name, blocks=list(blocks), keys=list(keys))


def _is_stack(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    children = list(module)
    first = type(children[0])
    return all(type(child) is first for child in children) and not isinstance(children[0], nn.Linear)


def find_block_stack(model: nn.Module, targets: Sequence[TargetLayer], blocks: str | None = None) -> BlockStack | None:
    """The block stack that holds the most target weights, or the one named by ``blocks``.

    A stack is an ``nn.ModuleList`` or ``nn.Sequential`` whose children all have the same class (decoder layers).
    Nested stacks (experts inside a layer) lose to the outer one because it holds more target weights.

    Args:
        model: The model being pruned.
        targets: The layers to prune.
        blocks: Module name of the stack (``"model.layers"``), or ``None`` to search.

    Returns:
        The stack, or ``None`` when the model has none holding a target layer.

    Raises:
        ValueError: If ``blocks`` names no module, or a module that is not a non-empty list of blocks.

    Example::

        >>> from wanda_lightning.core.targets import find_targets
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
        >>> stack = find_block_stack(net, find_targets(net)[0])
        >>> stack.name, len(stack.blocks)
        ('', 3)
    """
    if blocks is not None:
        if not isinstance(blocks, str):
            raise TypeError(f"`blocks` must be a module name such as 'model.layers', got {blocks!r}")
        try:
            module = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"`blocks`={blocks!r} names no submodule of {type(model).__name__}") from None
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            raise ValueError(
                f"`blocks`={blocks!r} is a {type(module).__name__}; it must name a non-empty nn.ModuleList or "
                "nn.Sequential of blocks"
            )
        return _stack(blocks, module)

    best: BlockStack | None = None
    best_weight = 0
    for name, module in model.named_modules():
        if not _is_stack(module):
            continue
        prefix = f"{name}." if name else ""
        weight = sum(t.weight_2d.numel() for t in targets if t.name.startswith(prefix))
        if weight > best_weight:
            best, best_weight = _stack(name, module), weight
    return best
