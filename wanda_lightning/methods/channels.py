"""Input-channel permutation for N:M sparsity (RIA's channel reallocation), only where the model absorbs it exactly.

An N:M pattern keeps ``n`` weights of every ``m`` consecutive input channels of a row. Which channels share a group is
arbitrary: RIA (Zhang et al., ICLR 2024) reorders them so that important channels do not compete in one group. A
reordering of a layer's input channels leaves the model's function unchanged only if whatever produces those channels
is reordered the same way. Inside a transformer MLP that is exact and free: the down projection's input channels are
the hidden units of the up (and gate) projections, with only element-wise functions in between, so permuting the
producers' output rows and the consumer's input columns together is a reparametrization. Every other input (the
residual stream, attention heads) is shared or structured, and is left in its order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ..core.layers import is_conv1d
from ..core.masks import keep_mask

__all__ = ["ChannelCoupling", "find_channel_couplings", "reallocate_channels", "retained_score"]

# Consumer attribute name -> the producer attribute names, on the same parent module.
PRODUCERS: dict[str, tuple[str, ...]] = {
    "down_proj": ("gate_proj", "up_proj"),  # Llama, Mistral, Qwen2, Gemma, SmolLM
    "w2": ("w1", "w3"),  # Mixtral-style experts
    "fc2": ("fc1",),  # OPT, Phi
    "dense_4h_to_h": ("dense_h_to_4h",),  # GPT-NeoX, Falcon
    "c_proj": ("c_fc",),  # GPT-2 and StarCoder MLPs (their attention's c_proj has c_attn, no c_fc)
}


def _rows_dim(module: nn.Module) -> int | None:
    """The weight dimension that indexes output channels: 0 for ``nn.Linear``, 1 for transformers' ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return 0
    return 1 if is_conv1d(module) else None


@dataclass
class ChannelCoupling:
    """A consumer layer whose input channels are exactly the output channels of ``producers``.

    Attributes:
        consumer: Name of the consumer (a target layer).
        producers: The modules whose output rows (and biases) must follow any permutation of the consumer's inputs.
    """

    consumer: str
    producers: list[nn.Module]

    def permute(self, consumer_weight: Tensor, index: Tensor) -> None:
        """Reorders the consumer's ``(out, in)`` weight columns and the producers' output channels by ``index``.

        Writes in place, so parameters keep their identity (optimizers and hooks that hold them stay valid).
        """
        consumer_weight.copy_(consumer_weight[:, index.to(consumer_weight.device)])
        for producer in self.producers:
            dim = _rows_dim(producer)
            assert dim is not None
            weight = cast(Tensor, producer.weight).data
            weight.copy_(weight.index_select(dim, index.to(weight.device)))
            bias = getattr(producer, "bias", None)
            if isinstance(bias, Tensor):
                bias.data.copy_(bias.data[index.to(bias.device)])


def _channel_count(consumer: nn.Module) -> int | None:
    dim = _rows_dim(consumer)
    if dim is None:
        return None
    return int(cast(Tensor, consumer.weight).shape[1 - dim])


def find_channel_couplings(model: nn.Module, consumers: Iterable[str]) -> dict[str, ChannelCoupling]:
    """The couplings of the named consumer layers whose input channels can be permuted exactly.

    A consumer qualifies when its parent module holds all the producers its name calls for (:data:`PRODUCERS`), each a
    Linear or Conv1D layer with as many output channels as the consumer has inputs, and no other parameter or buffer
    of the parent has a dimension of that size (a norm over the hidden units would need the permutation too).

    Example::

        >>> from torch import nn
        >>> mlp = nn.Module()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        >>> list(find_channel_couplings(mlp, ["down_proj", "up_proj"]))
        ['down_proj']
    """
    found: dict[str, ChannelCoupling] = {}
    for name in consumers:
        parent_name, _, attribute = name.rpartition(".")
        if attribute not in PRODUCERS:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        consumer = getattr(parent, attribute, None)
        if not isinstance(consumer, nn.Module):
            continue
        channels = _channel_count(consumer)
        producers = [getattr(parent, p, None) for p in PRODUCERS[attribute]]
        if channels is None or not all(isinstance(p, nn.Module) for p in producers):
            continue
        modules = cast(list[nn.Module], producers)
        if not all(_rows_dim(p) is not None for p in modules):
            continue
        if any(int(cast(Tensor, p.weight).shape[cast(int, _rows_dim(p))]) != channels for p in modules):
            continue
        owned = {id(t) for m in [consumer, *modules] for t in [*m.parameters(), *m.buffers()]}
        others = [t for t in [*parent.parameters(), *parent.buffers()] if id(t) not in owned]
        if any(channels in t.shape for t in others):
            continue
        found[name] = ChannelCoupling(name, modules)
    return found


def retained_score(scores: Tensor, n: int, m: int) -> Tensor:
    """Sum of the scores an N:M mask keeps (the ``n`` highest of every ``m`` consecutive columns of each row).

    Example::

        >>> retained_score(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 2, 4).item()
        7.0
    """
    return scores.float()[keep_mask(scores, 1 - n / m, n, m)].sum()


def reallocate_channels(scores: Tensor, n: int, m: int) -> Tensor | None:
    """RIA's heuristic channel reallocation: a column order whose N:M mask keeps a larger total score, or ``None``.

    Columns are sorted by their summed score and dealt into the ``m`` slots of the groups in a zigzag (the first
    quarter of the order to slot 0 in increasing order, the second to slot 1 in decreasing order, ...), so that every
    group mixes columns of every importance. The order is returned only if it keeps more of the total score than
    the identity; RIA's reference code applies it regardless.

    Args:
        scores: ``(out, in)`` importance scores; ``in`` a multiple of ``m``.
        n: Weights kept per group.
        m: Group size.

    Returns:
        ``(in,)`` long tensor ``index``: column ``j`` of the permuted layer is column ``index[j]`` of the original.

    Example::

        >>> scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 1.0, 1.0]])
        >>> reallocate_channels(scores, 2, 4).tolist()
        [4, 7, 3, 0, 5, 6, 2, 1]
        >>> reallocate_channels(torch.tensor([[9.0, 1.0, 1.0, 8.0]]), 2, 4) is None
        True
    """
    columns = scores.shape[1]
    order = torch.sort(scores.float().sum(dim=0), stable=True).indices
    index = torch.empty_like(order)
    for slot in range(m):
        chunk = order[columns * slot // m : columns * (slot + 1) // m]
        index[slot::m] = chunk if slot % 2 == 0 else chunk.flip(0)
    if bool(retained_score(scores[:, index], n, m) > retained_score(scores, n, m)):
        return index
    return None
