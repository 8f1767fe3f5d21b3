"""A transformers config that says what a width-pruned model is: widths, head counts, head size and bias flags, so
that ``save_pretrained`` writes a folder stock ``from_pretrained`` loads.

Whether a family's config can express a width is not guessed: the planned config builds a model on the meta device
(no memory, no weights) and its layers are compared with the planned shapes before any weight changes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.layers import describe_family
from .groups import UnitGroup, find_unit_groups

__all__ = ["MLP_WIDTH_KEYS", "check_expressible", "config_updates", "describe_family", "sync_config"]

#: Config attributes that hold the MLP hidden width, by family (Llama & co., OPT, GPT-2).
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")
_BIAS_FLAGS = {"mlp": "mlp_bias", "attention": "attention_bias"}


def config_updates(
    config: Any, groups: Sequence[UnitGroup], units: dict[str, int], biased: Sequence[str] = ()
) -> dict[str, Any]:
    """The config attributes that describe uniform widths.

    Args:
        config: The model's config.
        groups: The model's unit groups.
        units: Units kept per group kind (``{"mlp": 768, "attention": 2}``); a kind left out is unchanged.
        biased: Group kinds whose consumer must carry a bias (bias compensation).

    Returns:
        ``{attribute: value}``; only keys the config has (``intermediate_size`` or ``ffn_dim`` or ``n_inner``;
        ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``; ``mlp_bias`` / ``attention_bias``).

    Raises:
        ValueError: If a kind asked for has no attribute that holds its width in this config.
    """
    keys = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    updates: dict[str, Any] = {}
    if "mlp" in units:
        key = next((k for k in MLP_WIDTH_KEYS if k in keys), None)
        if key is None:
            raise ValueError(
                f"the {describe_family(config)} config has none of {list(MLP_WIDTH_KEYS)} for the MLP width"
            )
        updates[key] = units["mlp"]
    attention = [g for g in groups if g.kind == "attention" and g.problem is None]
    if "attention" in units and attention:
        group = attention[0]
        assert group.head_dim is not None
        per_group = group.consumer.per_unit // group.head_dim  # query heads per key/value head
        if "num_attention_heads" not in keys:
            raise ValueError(f"the {describe_family(config)} config has no `num_attention_heads`")
        updates["num_attention_heads"] = units["attention"] * per_group
        if "num_key_value_heads" in keys:
            updates["num_key_value_heads"] = units["attention"]
        updates["head_dim"] = group.head_dim
    for kind in biased:
        flag = _BIAS_FLAGS[kind]
        if flag in keys:
            updates[flag] = True
    return updates


def _build_meta(model: nn.Module, config: Any) -> nn.Module:
    with torch.device("meta"):
        return type(model)(config)


def check_expressible(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    units: dict[str, int],
    biased: Sequence[str] = (),
    prefix: str = "",
) -> tuple[dict[str, Any], list[str]]:
    """Checks that the config, updated for ``units``, builds exactly the planned layers.

    Returns:
        ``(updates, bias_layers)``: the config attributes to set, and the group layers that must gain a (zero) bias
        because a bias flag the update sets gives them one (``mlp_bias`` adds biases to ``gate_proj`` and
        ``up_proj`` too).

    Args:
        model: A transformers model (with ``config``).
        groups: Its unit groups.
        units: Units kept per kind.
        biased: Kinds whose consumers get a bias.
        prefix: What the groups' layer names start with before ``model``'s own names (``"model."`` when ``model``
            sits inside a LightningModule).

    Raises:
        ValueError: Naming a layer whose planned shape (or bias) the config cannot express, and why.
    """
    config = model.config
    family = describe_family(config)
    updates = config_updates(config, groups, units, biased)
    planned = copy.deepcopy(config)
    for key, value in updates.items():
        setattr(planned, key, value)
    try:
        meta = _build_meta(model, planned)
    except (ValueError, AssertionError, ZeroDivisionError, RuntimeError) as error:
        kinds = " and ".join(sorted(units))
        raise ValueError(
            f"the {family} config cannot express the {kinds} widths asked for ({updates}): building the model from it "
            f"fails with {type(error).__name__}: {error}"
        ) from None
    built = {g.consumer.name: g for g in find_unit_groups(meta, None, list(units))}
    bias_layers: list[str] = []
    for group in groups:
        if group.kind not in units:
            continue
        twin = built.get(group.consumer.name.removeprefix(prefix))
        kept = units[group.kind]
        if twin is None or twin.num_units != kept:
            found = "no such group" if twin is None else f"{twin.num_units} units"
            raise ValueError(
                f"layer {group.consumer.name!r}: the {family} config cannot express {kept} {_unit_word(group)} per "
                f"layer with the other sizes unchanged (a model built from {updates} has {found}); its head size is "
                "derived from the hidden size"
                if group.kind == "attention"
                else f"layer {group.consumer.name!r}: the {family} config cannot express an MLP width of {kept} "
                f"(a model built from {updates} has {found})"
            )
        for member, twin_member in zip(group.members, twin.members, strict=True):
            if member.per_unit != twin_member.per_unit:
                raise ValueError(
                    f"layer {member.name!r}: the {family} config cannot express {kept} {_unit_word(group)} per layer "
                    f"of {group.head_dim} channels each: it derives the head size from the hidden size and the head "
                    f"count (a model built from {updates} has {twin.head_dim} channels per head); set `heads`=0"
                )
            if getattr(twin_member.module, "bias", None) is not None and getattr(member.module, "bias", None) is None:
                bias_layers.append(member.name)
        if group.kind in biased and getattr(twin.consumer.module, "bias", None) is None:
            raise ValueError(
                f"layer {group.consumer.name!r}: bias compensation needs a bias there, which the {family} config "
                "cannot express; use update='least-squares' (weights only there), update='none' or method='wanda-sp'"
            )
    return updates, bias_layers


def _unit_word(group: UnitGroup) -> str:
    if group.kind == "mlp":
        return "hidden units"
    assert group.head_dim is not None
    return "heads" if group.consumer.per_unit == group.head_dim else "key/value groups"


def sync_config(model: nn.Module) -> dict[str, Any]:
    """Writes the widths the model's layers have now into its config (uniform widths); returns what changed.

    Raises:
        ValueError: If the layers of one kind do not all have the same width (the config holds one number).
    """
    config = getattr(model, "config", None)
    if config is None:
        return {}
    groups = [g for g in find_unit_groups(model, None, ["mlp", "attention"]) if g.problem is None]
    units: dict[str, int] = {}
    biased: list[str] = []
    for kind in ("mlp", "attention"):
        widths = {g.num_units for g in groups if g.kind == kind}
        if len(widths) > 1:
            raise ValueError(f"the {kind} widths differ across layers ({sorted(widths)}): one config cannot hold them")
        if widths:
            units[kind] = widths.pop()
        if any(g.kind == kind and getattr(g.consumer.module, "bias", None) is not None for g in groups):
            biased.append(kind)
    updates = config_updates(config, groups, units, biased)
    changed = {key: value for key, value in updates.items() if getattr(config, key, None) != value}
    for key, value in changed.items():
        setattr(config, key, value)
    return changed
