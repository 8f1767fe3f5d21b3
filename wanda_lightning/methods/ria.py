"""RIA (Zhang et al., ICLR 2024): Relative Importance and Activations, with N:M channel permutation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.statistics import InputNormStatistics, LayerStatistics, expect_statistics
from .base import PruningMethod

__all__ = ["RIA"]


class RIA(PruningMethod):
    """Relative Importance and Activations (Zhang et al., ICLR 2024).

    ``S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||^a``: a weight's share of its input column plus
    its share of its output row, times the input feature's L2 norm to the power ``a``.

    With ``permute_channels=True`` and an N:M structure, RIA's channel permutation (heuristic channel reallocation)
    reorders the input channels of each layer where the model absorbs the new order exactly: an MLP's down projection,
    whose input channels are the hidden units of its gate/up projections (their output rows move with it). The pruned
    model computes what the unpermuted one would with that mask, its weights stay plain N:M in storage order (2:4
    kernels and exports work unchanged), and the permuted layers are listed in ``PruningReport.permuted_layers``.
    Layers fed by the residual stream or by attention heads keep their order: reordering them per layer would need a
    gather of the inputs at inference, as RIA's reference code leaves to future work.

    Args:
        a: Exponent of the activation norm (default 0.5).
        permute_channels: Channel permutation for N:M structures (``method="ria-permuted"``).

    Example::

        >>> RIA(a=0.5).describe(), RIA(permute_channels=True).describe()
        ('ria (a=0.5)', 'ria (a=0.5, permuted channels)')
    """

    name = "ria"

    def __init__(self, a: float = 0.5, permute_channels: bool = False) -> None:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"`a` must be a finite number, got {a!r}")
        if not isinstance(permute_channels, bool):
            raise ValueError(f"`permute_channels` must be True or False, got {permute_channels!r}")
        self.a = float(a)
        self.permute_channels = permute_channels

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return InputNormStatistics(in_features, device)

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        mean_sq_norm = expect_statistics(statistics, InputNormStatistics, "RIA").mean_sq_norm
        magnitude = weight.abs().float()  # (out, in)
        tiny = torch.finfo(torch.float32).tiny
        relative = magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
        relative += magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
        norms = mean_sq_norm.sqrt().to(weight.device).pow(self.a)  # (in,)
        return relative * norms.unsqueeze(0)

    def describe(self) -> str:
        return f"ria (a={self.a:g}, permuted channels)" if self.permute_channels else f"ria (a={self.a:g})"

    def __repr__(self) -> str:
        return f"RIA(a={self.a}, permute_channels=True)" if self.permute_channels else f"RIA(a={self.a})"
