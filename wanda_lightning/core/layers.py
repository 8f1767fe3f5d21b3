"""What kind of module is this: linear layers (``nn.Linear``, transformers' ``Conv1D``) and transformers models.

Every other module asks these questions through here, so that each is answered one way. Whether a tensor is a
DTensor is answered by :func:`~wanda_lightning.distributed.sharding.is_dtensor`, below the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.sharding import is_dtensor

__all__ = [
    "find_pretrained",
    "is_conv1d",
    "is_linear_layer",
    "local_tensor",
    "module_device",
    "pretrained_class",
]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2-style ``Conv1D``: a linear layer whose weight is ``(in, out)``.

    Matched by name, so that transformers stays an optional dependency.

    Example::

        >>> is_conv1d(nn.Linear(2, 2))
        False
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a transformers ``Conv1D``: the layers that can be pruned.

    Example::

        >>> is_linear_layer(nn.Linear(2, 2)), is_linear_layer(nn.ReLU())
        (True, False)
    """
    return isinstance(module, nn.Linear) or is_conv1d(module)


def pretrained_class() -> type[nn.Module] | None:
    """transformers' ``PreTrainedModel``, or ``None`` when transformers is not installed."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        return None
    return PreTrainedModel


def find_pretrained(model: nn.Module) -> tuple[Any, str] | None:
    """The transformers model inside ``model`` with its module name: ``model`` itself (name ``""``), or the one
    outermost ``PreTrainedModel`` it holds (say, a LightningModule wrapping it); ``None`` when there is none.

    Raises:
        TypeError: If ``model`` holds several transformers models side by side (which one is meant is unclear).

    Example::

        >>> find_pretrained(nn.Linear(2, 2)) is None
        True
    """
    pretrained = pretrained_class()
    if pretrained is None:  # pragma: no cover
        return None
    if isinstance(model, pretrained):
        return model, ""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, pretrained) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    if not found:
        return None
    if len(found) > 1:
        raise TypeError(
            f"{type(model).__name__} holds {len(found)} transformers models ({[n for n, _ in found][:3]}); expected one"
        )
    return found[0][1], found[0][0]


def module_device(module: nn.Module) -> torch.device | None:
    """The device of the first parameter (else buffer) of ``module``, or ``None`` when it holds neither.

    Example::

        >>> module_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor as a plain tensor view (in-place writes reach the DTensor); a plain tensor as is.

    Example::

        >>> t = torch.ones(2); local_tensor(t) is t
        True
    """
    if is_dtensor(tensor):
        return tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def describe_family(config: Any) -> str:
    """``"llama"`` or the config class name, for messages."""
    return str(getattr(config, "model_type", None) or type(config).__name__)
