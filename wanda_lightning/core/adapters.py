"""Adapters (PEFT LoRA, DoRA, ``modules_to_save``) and quantized layers: which linear layers of a model are never
pruned, which stand for the layer they wrap, and which cannot be pruned at all.

A PEFT tuner layer (``peft.tuners.lora.LoraLayer``) wraps the model's layer as ``base_layer`` and adds adapter
modules next to it (``lora_A``, ``lora_B``, ``lora_embedding_A``/``_B``, DoRA's ``lora_magnitude_vector``). The
wrapper calls ``base_layer(x)`` with its own input, so hooks on the base layer see exactly what the wrapped layer
sees: the base layer is the target, under its own name (``...q_proj.base_layer``), and the adapter matrices are never
targets. peft's ``ModulesToSaveWrapper`` keeps an inactive ``original_module`` next to the trained copies
(``modules_to_save.<adapter>``); only the copy that runs is a target.

Everything is looked up by class only when ``peft`` has been imported: a model cannot hold its layers otherwise, so
peft stays an optional dependency.

Example::

    >>> from torch import nn
    >>> roles = adapter_roles(nn.Sequential(nn.Linear(2, 2)))
    >>> roles.adapters, roles.aliases
    ({}, {})
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["AdapterRoles", "adapter_roles", "has_adapters", "quantization_of", "tuner_layer_class"]


def tuner_layer_class() -> type[Any] | None:
    """peft's ``BaseTunerLayer``, or ``None`` when peft was never imported (then no model holds one)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - a broken or very old peft
        return None
    return BaseTunerLayer


def _modules_to_save_class() -> type[Any] | None:
    if "peft" not in sys.modules:
        return None
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        return None
    return ModulesToSaveWrapper


@dataclass
class AdapterRoles:
    """What PEFT did to a model's modules, by module name.

    Attributes:
        adapters: Adapter modules (and everything under them) with the name of the tuner layer they belong to.
        aliases: Base layers with the name of their outermost wrapper (``"x.q_proj.base_layer"`` ->
            ``"x.q_proj"``), so that name patterns written for the plain model still select them.
        inactive: Modules that never run while the adapters are active (``modules_to_save``'s original), with why.
        merged: Tuner layers whose adapters are merged into the base weight right now.
    """

    adapters: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    inactive: dict[str, str] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)

    def role_of(self, name: str) -> tuple[str, str] | None:
        """``("adapter", wrapper)`` or ``("inactive", reason)`` for a module inside one, else ``None``."""
        for table, role in ((self.adapters, "adapter"), (self.inactive, "inactive")):
            found = _lookup(table, name)
            if found is not None:
                return role, found
        return None


def _lookup(table: dict[str, str], name: str) -> str | None:
    """The value for ``name`` or for its closest enclosing module name in ``table``."""
    while True:
        if name in table:
            return table[name]
        if "." not in name:
            return None
        name = name.rpartition(".")[0]


def _prefixed(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


def adapter_roles(model: nn.Module) -> AdapterRoles:
    """Finds PEFT's adapter modules, wrapped base layers, inactive copies and merged layers in ``model``.

    Returns:
        An :class:`AdapterRoles`, empty for a model without PEFT layers.
    """
    roles = AdapterRoles()
    tuner = tuner_layer_class()
    if tuner is None:
        return roles
    saved = _modules_to_save_class()
    for name, module in model.named_modules():
        if isinstance(module, tuner) and hasattr(module, "base_layer"):
            if bool(getattr(module, "merged", False)):
                roles.merged.append(name)
            for child_name, _ in module.named_children():
                if child_name != "base_layer":
                    roles.adapters.setdefault(_prefixed(name, child_name), name)
            base = _prefixed(name, "base_layer")
            # The outermost wrapper names the layer (wrappers can be nested: LoRA on top of another tuner).
            outer = roles.aliases.get(name, name)
            roles.aliases[base] = outer
        elif saved is not None and isinstance(module, saved):
            running = [] if bool(getattr(module, "disable_adapters", False)) else list(module.active_adapters)
            if running:
                roles.inactive[_prefixed(name, "original_module")] = (
                    "inactive original of peft's modules_to_save (its trained copy runs instead)"
                )
            for adapter, _ in getattr(module, "modules_to_save", nn.ModuleDict()).named_children():
                if adapter not in running:
                    roles.inactive[_prefixed(name, f"modules_to_save.{adapter}")] = (
                        f"inactive modules_to_save copy of adapter {adapter!r}"
                    )
    return roles


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds a PEFT tuner layer or ``modules_to_save`` wrapper.

    Example::

        >>> has_adapters(nn.Linear(2, 2))
        False
    """
    classes = tuple(c for c in (tuner_layer_class(), _modules_to_save_class()) if c is not None)
    return bool(classes) and any(isinstance(m, classes) for m in model.modules())


_QUANTIZED_WEIGHTS = {"Params4bit": "bitsandbytes 4-bit", "Int8Params": "bitsandbytes 8-bit"}


def quantization_of(module: nn.Module, weight: Any) -> str | None:
    """How a layer's weight is quantized (``"bitsandbytes 4-bit"``, ...), or ``None`` for a floating-point weight.

    bitsandbytes layers subclass ``nn.Linear`` but hold packed integer data (``Params4bit``, ``Int8Params``);
    zeroing entries of that data does not zero weights. Any other non-floating-point weight is refused too.

    Example::

        >>> quantization_of(nn.Linear(2, 2), nn.Linear(2, 2).weight) is None
        True
    """
    kind = _QUANTIZED_WEIGHTS.get(type(weight).__name__)
    if kind is not None:
        return kind
    if type(module).__module__.split(".")[0] == "bitsandbytes":
        return f"bitsandbytes ({type(module).__name__})"
    if isinstance(weight, Tensor) and not weight.is_floating_point() and not weight.is_meta:
        return f"{weight.dtype} weights"
    return None
