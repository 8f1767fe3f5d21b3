"""The data-free magnitude baseline: ``|W_ij|``, compared within each output row."""

from __future__ import annotations

from torch import Tensor

from ..core.statistics import LayerStatistics
from ..core.structure import SparsityStructure
from .base import PruningMethod

__all__ = ["Magnitude"]


class Magnitude(PruningMethod):
    """Magnitude baseline: ``S_ij = |W_ij|``, compared within each output row like Wanda; needs no data.

    (The Wanda reference code's magnitude baseline compares across the whole layer; per-row groups make this the
    exact ablation of Wanda's activation term.)

    Example::

        >>> import torch
        >>> Magnitude().score(torch.tensor([[-2.0, 1.0]]), None)
        tensor([[2., 1.]])
    """

    name = "magnitude"
    requires_calibration = False

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        return weight.abs().float()

    def shard_local(self, structure: SparsityStructure) -> bool:
        return True
