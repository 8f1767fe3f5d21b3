"""Merging PEFT adapters into pruned base weights without losing the sparsity: :func:`merge_adapters`.

A LoRA update ``B @ A`` is dense: merged as is (peft's ``merge_and_unload``), it writes into every pruned entry of
the base weight, and the merged model is no longer sparse. peft cannot know which entries were pruned; this merge
does: each layer's active adapters are merged by peft (LoRA, DoRA, ...) and the pruned entries are set to zero again,
so the merged model is exactly as sparse as the base was.

The merged model differs from the model with its adapters by the adapters' update at the pruned entries (and nothing
else): train the adapters after pruning (the callback keeps the base masks) and measure the merged model.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.adapters import has_adapters, quantization_of, tuner_layer_class

__all__ = ["merge_adapters", "merged_state_dict"]


def _peft_containers() -> tuple[type[Any], ...]:
    """peft's ``PeftModel`` and ``BaseTuner`` (``LoraModel``, ...): modules that can ``unload()`` themselves."""
    if "peft" not in sys.modules:
        return ()
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    return (PeftModel, BaseTuner)


def _check_layer(name: str, layer: Any, keep: Tensor | None) -> None:
    """Raises if ``layer`` cannot be merged keeping its zeros (quantized base, mask of another shape)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        return
    quantized = quantization_of(base, weight)
    if quantized is not None:
        raise ValueError(
            f"the base layer of {name!r} is quantized ({quantized}): merging into it cannot keep pruned entries at "
            "zero. Merge into a floating-point copy of the base model instead"
        )
    if keep is not None and tuple(keep.shape) != tuple(weight.shape):
        raise ValueError(
            f"the mask given for {name!r} has shape {tuple(keep.shape)}; its base weight has {tuple(weight.shape)}"
        )


def _merge_layer(layer: Any, keep: Tensor | None) -> None:
    """Merges ``layer``'s active adapters into its base weight, then zeroes the pruned entries again."""
    if bool(getattr(layer, "disable_adapters", False)) or bool(getattr(layer, "merged", False)):
        return  # disabled: the base alone is the model; merged: already in the weight
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        layer.merge()
        return
    drop = (~keep.to(device=weight.device, dtype=torch.bool)) if keep is not None else weight.detach() == 0
    layer.merge()
    with torch.no_grad():
        base.weight.masked_fill_(drop, 0)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def merge_adapters(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Merges every PEFT adapter (LoRA, DoRA, ...) into its base layer and keeps pruned weights at zero; returns the
    plain model.

    For each tuner layer, innermost first, the entries that were pruned are read (from ``masks``, else from the zeros
    of the base weight), peft merges the active adapters into the base weight, and those entries are set to zero
    again. Then the wrappers are removed: a ``PeftModel`` (or ``LoraModel``) is unloaded and its base model returned,
    like peft's ``merge_and_unload``; a ``PeftModel`` held inside ``model`` (say, by a LightningModule) is replaced by
    its base model in place; adapters injected without a ``PeftModel`` are replaced by their base layers. Works in
    place, like ``merge_and_unload``: merge a ``copy.deepcopy`` to keep the adapters.

    Args:
        model: A ``PeftModel``, a module holding one, or a module with injected adapter layers. A module without
            adapters is returned unchanged.
        masks: Keep masks (True where a weight is kept) by parameter name of the base weight, relative to ``model``
            (``"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"``), as
            :attr:`WandaPruningCallback.masks <wanda_lightning.WandaPruningCallback.masks>` gives them. A base layer
            without a mask keeps its zeros at zero (a kept weight that happens to be exactly 0 included).

    Returns:
        The merged model, with no adapter left.

    Raises:
        ValueError: If a base layer is quantized, or a mask does not fit its weight; nothing is merged then.

    Example::

        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        prune(model, batches, sparsity=0.5)         # prunes the base weights, never lora_A / lora_B
        ...                                         # fine-tune the adapters (the callback keeps the masks)
        merged = merge_adapters(model)              # a plain transformers model, exactly 50 % sparse
    """
    if not has_adapters(model):
        return model
    tuner = tuner_layer_class()
    assert tuner is not None
    masks = masks or {}
    layers = [
        (name, module, masks.get(f"{name}{'.base_layer' * _depth(module)}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, tuner) and hasattr(module, "base_layer")
    ]
    for name, layer, keep in layers:  # every check before the first merge: a refused model is left as it was
        _check_layer(name, layer, keep)
    for _, layer, keep in reversed(layers):  # innermost first: nested wrappers merge into an already merged base
        _merge_layer(layer, keep)

    containers = _peft_containers()
    if isinstance(model, containers):
        return cast(nn.Module, model.unload())
    outer: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, containers) and not any(name.startswith(f"{o}.") for o in outer):
            outer.append(name)
    for name in outer:
        _replace(model, name, model.get_submodule(name).unload())  # type: ignore[operator]
    _unload_injected(model)
    return model


def _depth(layer: Any) -> int:
    depth, module = 0, layer
    while hasattr(module, "base_layer"):
        module, depth = module.base_layer, depth + 1
    return depth


def _unload_injected(model: nn.Module) -> None:
    """Replaces adapter wrappers that no ``PeftModel`` owns by the modules they wrap (the active copy for
    ``modules_to_save``)."""
    tuner = tuner_layer_class()
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    while True:
        found = next(
            (
                (name, module)
                for name, module in model.named_modules()
                if isinstance(module, AuxiliaryTrainingWrapper) or (tuner is not None and isinstance(module, tuner))
            ),
            None,
        )
        if found is None:
            return
        name, module = found
        if isinstance(module, ModulesToSaveWrapper):
            running = [] if module.disable_adapters else list(module.active_adapters)
            replacement = module.modules_to_save[running[0]] if running else module.original_module
        elif hasattr(module, "base_layer"):
            replacement = module.get_base_layer()
        else:
            raise ValueError(
                f"{name!r} is a {type(module).__name__}, which merge_adapters cannot unload outside a PeftModel; "
                "merge the PeftModel that holds it"
            )
        _replace(model, name, replacement)


def merged_state_dict(module: nn.Module, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``module.state_dict()`` with every ``PeftModel`` inside it merged (on a copy, with :func:`merge_adapters`),
    for modules that cannot be copied whole (a LightningModule attached to its trainer). ``module`` is not changed.

    Args:
        module: A module holding one or more ``PeftModel`` (or ``LoraModel``).
        masks: Keep masks by parameter name, relative to ``module``.

    Raises:
        ValueError: If ``module`` holds adapters outside a ``PeftModel``.

    Example::

        state = merged_state_dict(lightning_module, callback.masks)  # keys as in the merged module
    """
    containers = _peft_containers()
    outer: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, containers) and not any(name.startswith(f"{o}.") for o in outer):
            outer.append(name)
    if not outer or "" in outer:
        if "" in outer:
            return dict(merge_adapters(copy.deepcopy(module), masks).state_dict())
        raise ValueError(
            f"{type(module).__name__} holds PEFT adapter layers outside a PeftModel; merge them with merge_adapters "
            "before exporting"
        )
    state = dict(module.state_dict())
    for name in outer:
        start = f"{name}."
        relative = {k.removeprefix(start): v for k, v in (masks or {}).items() if k.startswith(start)}
        merged = merge_adapters(copy.deepcopy(module.get_submodule(name)), relative)
        state = {key: value for key, value in state.items() if not key.startswith(start)}
        state.update({f"{start}{key}": value for key, value in merged.state_dict().items()})
    return state
