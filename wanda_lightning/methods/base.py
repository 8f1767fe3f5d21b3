"""The two extension points of mask pruning: a :class:`PruningMethod` chooses each layer's mask, a :class:`Refinement`
improves a mask (and the kept weights) that a method chose.

A method is a small object with three moves, so that new ones plug in without touching calibration or reporting:

1. :meth:`PruningMethod.new_statistics` makes a per-layer accumulator (or ``None`` when no data is needed);
2. :meth:`PruningMethod.score` turns a weight and its statistics into an importance matrix;
3. :meth:`PruningMethod.prune_layer` picks the keep mask and writes the pruned weight (methods that update the kept
   weights, such as SparseGPT, override this one and declare :attr:`PruningMethod.rewrites_weights`).

Register new methods with :func:`~wanda_lightning.methods.registry.register_method`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ..core.masks import keep_mask
from ..core.statistics import LayerStatistics
from ..core.structure import SparsityStructure
from .channels import reallocate_channels

__all__ = ["PruningMethod", "PruningWarning", "Refinement"]


class PruningWarning(UserWarning):
    """A method or refinement fell back on one layer (say, a numerical safeguard); ``prune()`` re-issues it with the
    layer's name in front."""


class PruningMethod(ABC):
    """Base class of pruning methods.

    Example::

        >>> class Random(PruningMethod):
        ...     name = "random"
        ...     requires_calibration = False
        ...     def score(self, weight, statistics):
        ...         return torch.rand(weight.shape)
    """

    name: ClassVar[str]
    requires_calibration: ClassVar[bool] = True
    #: Whether :meth:`prune_layer` rewrites the kept weights while it selects (SparseGPT, ADMM), instead of scoring,
    #: selecting and zeroing the pruned ones; such a method cannot re-prune a model keeping what was pruned before.
    rewrites_weights: ClassVar[bool] = False
    #: Reorder input channels before N:M selection where the model absorbs it exactly (see :meth:`channel_order`).
    permute_channels: bool = False

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics | None:
        """A fresh accumulator for a layer with ``in_features`` inputs, or ``None`` for data-free methods."""
        return None

    @abstractmethod
    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        """Importance of every weight.

        Args:
            weight: ``(out_features, in_features)`` weight in the model's dtype (a view for transposed layers).
            statistics: What :meth:`new_statistics` returned, after calibration.

        Returns:
            ``(out_features, in_features)`` float32 scores; higher means more important.
        """

    def select(self, scores: Tensor, structure: SparsityStructure, sparsity: float) -> Tensor:
        """The boolean keep mask for ``scores`` under ``structure`` at ``sparsity`` (per-row comparison groups)."""
        return keep_mask(scores, sparsity, structure.n, structure.m)

    def prune_layer(
        self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure, sparsity: float
    ) -> Tensor:
        """Prunes ``weight`` in place and returns its ``(out_features, in_features)`` boolean keep mask.

        Args:
            weight: ``(out_features, in_features)`` weight (possibly a transposed view) to modify in place.
            statistics: The layer's calibration statistics.
            structure: Sparsity pattern.
            sparsity: This layer's target sparsity (equal to ``structure.sparsity`` unless an allocation changed it).
        """
        scores = self.score(weight, statistics)
        if not bool(torch.isfinite(scores).all()):
            raise FloatingPointError("scores contain NaN or Inf (the weight itself is not finite)")
        keep = self.select(scores, structure, sparsity)
        weight.masked_fill_(~keep, 0)
        return keep

    def channel_order(
        self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure
    ) -> Tensor | None:
        """For an N:M structure: an order of the input channels whose mask keeps a larger total score, or ``None``.

        Used only when :attr:`permute_channels` is set, on layers whose inputs can be reordered without changing the
        model (:func:`~wanda_lightning.methods.channels.find_channel_couplings`). The default is RIA's heuristic channel
        reallocation of :meth:`score` (:func:`~wanda_lightning.methods.channels.reallocate_channels`).
        """
        assert structure.n is not None and structure.m is not None
        return reallocate_channels(self.score(weight, statistics), structure.n, structure.m)

    @property
    def cumulative_selection(self) -> bool:
        """Whether :meth:`select` ranks weights by cumulative scores (Wanda's variant), which weights pruned before
        would distort; ``False`` for the plain per-row selection."""
        return False

    def shard_local(self, structure: SparsityStructure) -> bool:
        """Whether each output row's mask depends only on that row and the statistics, so that a rank holding some
        rows of a weight (FSDP2's ``Shard(0)``) can prune them alone; ``False`` (the safe default) refuses sharded
        weights."""
        return False

    def clear_cache(self) -> None:  # noqa: B027 - optional
        """Drops what the method keeps from one layer to the next (say, a factorisation shared by layers fed the
        same input); ``prune()`` calls it after each block, so nothing outlives the block it came from."""

    def for_row_shards(self, structure: SparsityStructure) -> PruningMethod | None:
        """The method to run when target weights are split by output rows across processes (FSDP2's ``Shard(0)``):
        ``self`` when :meth:`shard_local`, else a variant whose rows are pruned independently, or ``None`` (the
        default) when there is none and sharded weights are refused. ``prune()`` warns when it switches."""
        return self if self.shard_local(structure) else None

    def describe(self) -> str:
        """Short human-readable name, including options."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Refinement(ABC):
    """Base class of mask refinements: run on each layer after its method chose the mask.

    A refinement may swap pruned and kept weights (keeping the count per row, or per N:M group) and rewrite the kept
    weights; it collects statistics of its own next to the method's.

    Example::

        >>> class KeepAsIs(Refinement):
        ...     name = "identity"
        ...     def new_statistics(self, in_features, device):
        ...         return None
        ...     def refine(self, dense, weight, keep, statistics, structure):
        ...         return keep
        >>> KeepAsIs().describe()
        'identity'
    """

    name: ClassVar[str]
    #: Whether :meth:`refine` may change the mask, swapping pruned and kept weights (DSnoT); the safe default is True.
    changes_mask: ClassVar[bool] = True
    #: Whether :meth:`refine` may give kept weights new values (ADMMUpdate); the safe default is True.
    rewrites_weights: ClassVar[bool] = True

    @abstractmethod
    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics | None:
        """A fresh accumulator for a layer with ``in_features`` inputs, or ``None`` when no data is needed."""

    @abstractmethod
    def refine(
        self,
        dense: Tensor,
        weight: Tensor,
        keep: Tensor,
        statistics: LayerStatistics | None,
        structure: SparsityStructure,
    ) -> Tensor:
        """Improves one layer's mask and weights.

        Args:
            dense: ``(out, in)`` float32 weights before pruning.
            weight: ``(out, in)`` weights after the method (pruned entries 0), written in place.
            keep: ``(out, in)`` bool keep mask the method chose.
            statistics: What :meth:`new_statistics` returned, after calibration.
            structure: The sparsity pattern, which the new mask must keep.

        Returns:
            The new ``(out, in)`` bool keep mask; ``weight`` is 0 wherever it is False.
        """

    def shard_local(self, structure: SparsityStructure) -> bool:
        """Whether each output row is refined from that row and the statistics alone (so FSDP2 row shards can be
        refined in place)."""
        return True

    def clear_cache(self) -> None:  # noqa: B027 - optional
        """Drops what the refinement keeps from one layer to the next; ``prune()`` calls it after each block."""

    def describe(self) -> str:
        """Short human-readable name, including options."""
        return self.name
