"""``torch.nn.MultiheadAttention`` as a pruning target.

The module computes its projections inside ``F.multi_head_attention_forward`` from its parameters, without calling
any ``nn.Linear``:

- the query, key and value projections live in one packed ``in_proj_weight`` ``(3E, E)`` (or in separate
  ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``). Each
  third is a target of its own, fed by the module's ``query``, ``key`` or ``value`` argument (the same tensor for
  self-attention, the encoder's memory for the key and value of cross-attention);
- ``out_proj`` is an ``nn.Linear`` whose weight is used but whose forward never runs, so hooks on it see nothing.
  While statistics are collected, :func:`split_attention` runs the attention with an identity output projection
  (multiplying by an identity matrix is exact) and then calls ``out_proj`` as a module on the result: its hooks see
  the attention output before the projection, and the block's output is what the model computes.

Torch's fused fast paths (``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` and ``nn.TransformerEncoder``
in eval mode without autograd) skip the modules too; calibration turns them off while it runs (see
:func:`~wanda_lightning.core.pipeline.calibration_mode`).

Example::

    >>> attention = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> for target in attention_targets("attn", attention):
    ...     print(target.name, target.parameter_name, target.rows, target.keyword)
    attn.in_proj_weight.q attn.in_proj_weight (0, 8) query
    attn.in_proj_weight.k attn.in_proj_weight (8, 16) key
    attn.in_proj_weight.v attn.in_proj_weight (16, 24) value
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .target_layer import TargetLayer

__all__ = ["attention_targets", "is_attention", "split_attention"]

_INPUTS = (("q", "query", 0), ("k", "key", 1), ("v", "value", 2))


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.nn.MultiheadAttention`` (or a subclass).

    Example::

        >>> is_attention(nn.MultiheadAttention(4, 2)), is_attention(nn.Linear(4, 4))
        (True, False)
    """
    return isinstance(module, nn.MultiheadAttention)


def attention_targets(name: str, module: nn.MultiheadAttention) -> list[TargetLayer]:
    """The query, key and value projections of ``module`` as three targets (``out_proj`` is found as a linear layer).

    Packed weights give ``<name>.in_proj_weight.q`` / ``.k`` / ``.v``: rows ``[0, E)``, ``[E, 2E)`` and ``[2E, 3E)``
    of ``in_proj_weight``; separate weights give ``<name>.q_proj_weight`` and so on.
    """
    targets = []
    embed = int(module.embed_dim)
    prefix = f"{name}." if name else ""
    for part, keyword, position in _INPUTS:
        if module._qkv_same_embed_dim:
            target = TargetLayer(
                name=f"{prefix}in_proj_weight.{part}",
                module=module,
                parameter="in_proj_weight",
                rows=(position * embed, (position + 1) * embed),
                position=position,
                keyword=keyword,
                module_name=name,
            )
        else:
            target = TargetLayer(
                name=f"{prefix}{part}_proj_weight",
                module=module,
                parameter=f"{part}_proj_weight",
                position=position,
                keyword=keyword,
                module_name=name,
            )
        targets.append(target)
    return targets


class _PreProjection(nn.Module):
    """Stands in for ``out_proj`` inside the attention: an identity weight and a zero bias (fused kernels want one), so
    the attention returns its output before the projection, exactly. Plain tensor attributes: nothing here is a
    parameter or a buffer."""

    def __init__(self, like: nn.Linear) -> None:
        super().__init__()
        dtype, device = like.weight.dtype, like.weight.device
        self.weight = torch.eye(like.in_features, dtype=dtype, device=device)
        self.bias = torch.zeros(like.in_features, dtype=dtype, device=device)


@contextmanager
def split_attention(layers: Sequence[TargetLayer]) -> Iterator[None]:
    """For each target that is the ``out_proj`` of a ``MultiheadAttention`` (:attr:`TargetLayer.attention`), runs the
    attention with an identity projection and calls the real ``out_proj`` on its output, for the ``with`` block.

    The modules are restored afterwards, also when an error (or a hook's early stop) ends the forward.
    """
    owners = {id(layer.attention): layer.attention for layer in layers if layer.attention is not None}
    with ExitStack() as stack:
        for attention in owners.values():
            stack.enter_context(_split(attention))
        yield


@contextmanager
def _split(attention: nn.Module) -> Iterator[None]:
    projection = attention.out_proj
    assert isinstance(projection, nn.Linear)

    def project(module: nn.Module, args: Any, output: Any) -> Any:
        hidden, weights = output
        return projection(hidden), weights

    attention.out_proj = _PreProjection(projection)
    handle = attention.register_forward_hook(project)
    try:
        yield
    finally:
        handle.remove()
        attention.out_proj = projection
