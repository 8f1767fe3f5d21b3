"""Wanda (Sun et al., ICLR 2024): ``|W_ij| * ||X_j||``, compared within each output row."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.masks import variant_keep_mask
from ..core.statistics import InputNormStatistics, LayerStatistics, expect_statistics
from ..core.structure import SparsityStructure
from .base import PruningMethod

__all__ = ["Wanda"]


class Wanda(PruningMethod):
    """Wanda (Sun et al., ICLR 2024): ``S_ij = |W_ij| * sqrt(mean over sequences of sum_t x_tj**2)``.

    Args:
        variant: Use the reference code's ``--use_variant`` selection (per-row cumulative-score threshold with one
            ratio per layer found by bisection) for unstructured sparsity. The achieved sparsity is then close to the
            target rather than exact: the bisection stops within 0.1 % of it, or when its bracket (ratios in
            [0, 0.8]) narrows below 0.001, which for very high or very low targets can leave it further away.

    Example::

        >>> from wanda_lightning import prune
        >>> method = Wanda(variant=True)
        >>> method.describe()
        'wanda (variant)'
    """

    name = "wanda"

    def __init__(self, variant: bool = False) -> None:
        if not isinstance(variant, bool):
            raise TypeError(f"`variant` must be a bool, got {variant!r}")
        self.variant = variant

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return InputNormStatistics(in_features, device)

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        norms = (
            expect_statistics(statistics, InputNormStatistics, "Wanda").mean_sq_norm.sqrt().to(weight.device)
        )  # (in,)
        return weight.abs().float() * norms.unsqueeze(0)  # (out, in)

    def select(self, scores: Tensor, structure: SparsityStructure, sparsity: float) -> Tensor:
        if self.variant and not structure.is_n_m:
            return variant_keep_mask(scores, sparsity)
        return super().select(scores, structure, sparsity)

    @property
    def cumulative_selection(self) -> bool:
        return self.variant

    def shard_local(self, structure: SparsityStructure) -> bool:
        # The variant's bisection hits the target sparsity of the whole layer, which needs every row.
        return not (self.variant and not structure.is_n_m)

    def describe(self) -> str:
        return "wanda (variant)" if self.variant else "wanda"

    def __repr__(self) -> str:
        return f"Wanda(variant={self.variant})"
