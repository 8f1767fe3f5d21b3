"""Which units a model can lose: each block's MLP hidden units and attention heads (or grouped-query KV groups), with
the layers that produce them and the layer that consumes them.

A *unit group* couples one consumer layer (``down_proj``, ``o_proj``, ...) with its producers (``gate_proj`` and
``up_proj``; ``q_proj``, ``k_proj`` and ``v_proj``). Unit ``u`` owns a run of consecutive channels in every member:
``per_unit`` output rows of each producer and ``per_unit`` input columns of the consumer. Removing a unit removes
those channels from all members at once, so the block computes what it computed with the unit's consumer columns
zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from ..core.blocks import BlockStack
from ..core.layers import is_conv1d, is_linear_layer
from ..core.target_layer import TargetLayer
from ..methods.channels import PRODUCERS

__all__ = ["ATTENTION_PRODUCERS", "Member", "UnitGroup", "UnitKind", "find_unit_groups", "out_channels"]

UnitKind = Literal["mlp", "attention"]

#: Attention output projection name -> its query, key and value projections, on the same parent module.
ATTENTION_PRODUCERS: dict[str, tuple[str, str, str]] = {
    "o_proj": ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, Phi-3 (separate q/k/v)
    "out_proj": ("q_proj", "k_proj", "v_proj"),  # OPT, BART-style
}
#: Fused attention layouts: output projection name -> the fused input projection.
_FUSED_ATTENTION: dict[str, str] = {"c_proj": "c_attn", "dense": "query_key_value"}


def out_channels(module: nn.Module) -> int:
    """Output channels of a Linear or Conv1D layer."""
    weight = cast(Tensor, module.weight)
    return int(weight.shape[1] if is_conv1d(module) else weight.shape[0])


def _in_channels(module: nn.Module) -> int:
    weight = cast(Tensor, module.weight)
    return int(weight.shape[0] if is_conv1d(module) else weight.shape[1])


@dataclass
class Member:
    """One layer of a unit group.

    Attributes:
        name: Module name in the model.
        module: The Linear or Conv1D layer.
        per_unit: Channels each unit owns in this layer (output rows of a producer, input columns of the consumer).
    """

    name: str
    module: nn.Module
    per_unit: int

    def channels(self, units: Tensor) -> Tensor:
        """The channel indices owned by ``units`` (sorted unit indices), in order."""
        offsets = torch.arange(self.per_unit, device=units.device)
        return (units.unsqueeze(1) * self.per_unit + offsets).reshape(-1)


@dataclass
class UnitGroup:
    """A block's MLP hidden units or attention heads, with the layers that hold them.

    Attributes:
        kind: ``"mlp"`` or ``"attention"``.
        block: Index of the block in the stack (``None`` outside one).
        consumer: The layer that reads the units (its input columns).
        producers: The layers that write them (their output rows).
        num_units: Units in the group: hidden units, heads, or KV groups (a KV head with its query heads).
        head_dim: Channels per head (attention), else ``None``.
        problem: Why the group cannot lose units (a fused projection), or ``None``.
    """

    kind: UnitKind
    block: int | None
    consumer: Member
    producers: list[Member]
    num_units: int
    head_dim: int | None = None
    problem: str | None = None

    @property
    def members(self) -> list[Member]:
        """Producers, then the consumer."""
        return [*self.producers, self.consumer]

    def target(self) -> TargetLayer:
        """The consumer as a :class:`~wanda_lightning.core.targets.TargetLayer` (whose input statistics score the
        units)."""
        return TargetLayer(self.consumer.name, self.consumer.module, transposed=is_conv1d(self.consumer.module))


def _mlp_group(parent_name: str, parent: nn.Module, attribute: str, block: int | None) -> UnitGroup | None:
    consumer = getattr(parent, attribute, None)
    producers = [getattr(parent, name, None) for name in PRODUCERS[attribute]]
    if not isinstance(consumer, nn.Module) or not is_linear_layer(consumer):
        return None
    if not all(isinstance(p, nn.Module) and is_linear_layer(p) for p in producers):
        return None
    width = _in_channels(consumer)
    if any(out_channels(cast(nn.Module, p)) != width for p in producers):
        return None
    prefix = f"{parent_name}." if parent_name else ""
    return UnitGroup(
        kind="mlp",
        block=block,
        consumer=Member(f"{prefix}{attribute}", consumer, 1),
        producers=[
            Member(f"{prefix}{name}", cast(nn.Module, p), 1)
            for name, p in zip(PRODUCERS[attribute], producers, strict=True)
        ],
        num_units=width,
    )


def _head_dim(parent: nn.Module, config: object | None, query_rows: int) -> int | None:
    value = getattr(parent, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    heads = getattr(parent, "num_heads", None) or getattr(config, "num_attention_heads", None)
    return query_rows // heads if isinstance(heads, int) and heads > 0 and query_rows % heads == 0 else None


def _attention_group(
    parent_name: str, parent: nn.Module, attribute: str, block: int | None, config: object | None
) -> UnitGroup | None:
    consumer = getattr(parent, attribute, None)
    if not isinstance(consumer, nn.Module) or not is_linear_layer(consumer):
        return None
    prefix = f"{parent_name}." if parent_name else ""
    if attribute in _FUSED_ATTENTION and isinstance(getattr(parent, _FUSED_ATTENTION[attribute], None), nn.Module):
        fused = _FUSED_ATTENTION[attribute]
        return UnitGroup(
            kind="attention",
            block=block,
            consumer=Member(f"{prefix}{attribute}", consumer, 1),
            producers=[],
            num_units=0,
            problem=f"its queries, keys and values come from one fused layer `{prefix}{fused}`",
        )
    if attribute not in ATTENTION_PRODUCERS:
        return None
    q, k, v = (getattr(parent, name, None) for name in ATTENTION_PRODUCERS[attribute])
    if not all(isinstance(m, nn.Linear) for m in (q, k, v)) or not isinstance(consumer, nn.Linear):
        return None
    q, k, v = cast(nn.Linear, q), cast(nn.Linear, k), cast(nn.Linear, v)
    head_dim = _head_dim(parent, config, q.out_features)
    if head_dim is None or q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if kv_heads == 0 or heads % kv_heads or consumer.in_features != q.out_features:
        return None
    per_group = heads // kv_heads  # query heads sharing one key/value head
    names = ATTENTION_PRODUCERS[attribute]
    return UnitGroup(
        kind="attention",
        block=block,
        consumer=Member(f"{prefix}{attribute}", consumer, per_group * head_dim),
        producers=[
            Member(f"{prefix}{names[0]}", q, per_group * head_dim),
            Member(f"{prefix}{names[1]}", k, head_dim),
            Member(f"{prefix}{names[2]}", v, head_dim),
        ],
        num_units=kv_heads,
        head_dim=head_dim,
    )


def find_unit_groups(model: nn.Module, stack: BlockStack | None, kinds: Sequence[str]) -> list[UnitGroup]:
    """Every MLP and attention unit group of the kinds asked for, in model order.

    MLPs are found by their consumer's name (``down_proj``, ``fc2``, ``dense_4h_to_h``, GPT-2's ``mlp.c_proj``,
    ``w2``) next to its producers; attention by ``o_proj`` / ``out_proj`` next to ``q_proj``, ``k_proj`` and
    ``v_proj``. Fused attention (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``) is listed with a ``problem``.

    Args:
        model: The model.
        stack: Its block stack (for each group's block index), or ``None``.
        kinds: ``"mlp"`` and/or ``"attention"``.

    Example::

        >>> mlp = nn.Module()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        >>> [(g.kind, g.consumer.name, g.num_units) for g in find_unit_groups(mlp, None, ["mlp"])]
        [('mlp', 'down_proj', 16)]
    """
    config = getattr(model, "config", None)
    groups: list[UnitGroup] = []
    for parent_name, parent in model.named_modules():
        for attribute in dict(parent.named_children()):
            name = f"{parent_name}.{attribute}" if parent_name else attribute
            block = stack.index_of(name) if stack is not None else None
            group: UnitGroup | None = None
            if "mlp" in kinds and attribute in PRODUCERS:
                group = _mlp_group(parent_name, parent, attribute, block)
            if group is None and "attention" in kinds and attribute in (*ATTENTION_PRODUCERS, *_FUSED_ATTENTION):
                group = _attention_group(parent_name, parent, attribute, block, getattr(parent, "config", config))
            if group is not None:
                groups.append(group)
    return groups
