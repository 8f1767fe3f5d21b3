"""Pruning methods: what statistics a method collects, how it scores weights, and how it prunes one layer.

A method is a small object with three moves, so that new ones plug in without touching calibration or reporting:

1. :meth:`PruningMethod.new_statistics` makes a per-layer accumulator (or ``None`` when no data is needed);
2. :meth:`PruningMethod.score` turns a weight and its statistics into an importance matrix;
3. :meth:`PruningMethod.prune_layer` picks the keep mask and writes the pruned weight (methods that update the kept
   weights, such as SparseGPT, override this one).

Register new methods with :func:`register_method`; :func:`get_method` resolves names.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .channels import reallocate_channels
from .masks import keep_mask, variant_keep_mask
from .sparsegpt import inverse_hessian_factor, sparsegpt_prune
from .statistics import GramStatistics, InputNormStatistics, LayerStatistics
from .structure import SparsityStructure

__all__ = [
    "RIA",
    "Magnitude",
    "PruningMethod",
    "SparseGPT",
    "Wanda",
    "available_methods",
    "get_method",
    "register_method",
]


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
        model (:func:`~wanda_lightning.channels.find_channel_couplings`). The default is RIA's heuristic channel
        reallocation of :meth:`score` (:func:`~wanda_lightning.channels.reallocate_channels`).
        """
        assert structure.n is not None and structure.m is not None
        return reallocate_channels(self.score(weight, statistics), structure.n, structure.m)

    def shard_local(self, structure: SparsityStructure) -> bool:
        """Whether each output row's mask depends only on that row and the statistics, so that a rank holding some
        rows of a weight (FSDP2's ``Shard(0)``) can prune them alone; ``False`` (the safe default) refuses sharded
        weights."""
        return False

    def describe(self) -> str:
        """Short human-readable name, including options."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
        if not isinstance(statistics, InputNormStatistics):
            raise TypeError("Wanda needs InputNormStatistics from calibration")
        norms = statistics.mean_sq_norm.sqrt().to(weight.device)  # (in,)
        return weight.abs().float() * norms.unsqueeze(0)  # (out, in)

    def select(self, scores: Tensor, structure: SparsityStructure, sparsity: float) -> Tensor:
        if self.variant and not structure.is_n_m:
            return variant_keep_mask(scores, sparsity)
        return super().select(scores, structure, sparsity)

    def shard_local(self, structure: SparsityStructure) -> bool:
        # The variant's bisection hits the target sparsity of the whole layer, which needs every row.
        return not (self.variant and not structure.is_n_m)

    def describe(self) -> str:
        return "wanda (variant)" if self.variant else "wanda"

    def __repr__(self) -> str:
        return f"Wanda(variant={self.variant})"


class Magnitude(PruningMethod):
    """Magnitude baseline: ``S_ij = |W_ij|``, compared within each output row like Wanda; needs no data.

    (The Wanda reference code's magnitude baseline compares across the whole layer; per-row groups make this the
    exact ablation of Wanda's activation term.)

    Example::

        >>> Magnitude().score(torch.tensor([[-2.0, 1.0]]), None)
        tensor([[2., 1.]])
    """

    name = "magnitude"
    requires_calibration = False

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        return weight.abs().float()

    def shard_local(self, structure: SparsityStructure) -> bool:
        return True


class SparseGPT(PruningMethod):
    """SparseGPT (Frantar & Alistarh, 2023): adaptive mask selection with OBS updates of the kept weights.

    Collects each layer's input Gram matrix (float32, freed with the layer's statistics once the layer is pruned),
    dampens it by ``percdamp`` of its mean diagonal (10x more, up to 3 times, if it is still singular) and runs the
    blocked solver of :func:`~wanda_lightning.sparsegpt.sparsegpt_prune`.

    Args:
        blocksize: Columns per lazy-update block (default 128).
        percdamp: Dampening as a fraction of the mean Hessian diagonal (default 0.01).

    Example::

        >>> SparseGPT().describe()
        'sparsegpt'
    """

    name = "sparsegpt"

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"`blocksize` must be a positive integer, got {blocksize!r}")
        if not 0.0 < percdamp < 1.0:
            raise ValueError(f"`percdamp` must be in (0, 1), got {percdamp!r}")
        self.blocksize = blocksize
        self.percdamp = percdamp

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return GramStatistics(in_features, device)

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        """SparseGPT's saliency before any update: ``w^2 / [H^-1]_jj^2``."""
        if not isinstance(statistics, GramStatistics):
            raise TypeError("SparseGPT needs GramStatistics from calibration")
        factor, _ = inverse_hessian_factor(statistics.gram, self.percdamp)
        return weight.float().square() / torch.diagonal(factor).square().unsqueeze(0)

    def prune_layer(
        self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure, sparsity: float
    ) -> Tensor:
        if not isinstance(statistics, GramStatistics):
            raise TypeError("SparseGPT needs GramStatistics from calibration")
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError("the weight is not finite")
        new_weight, keep = sparsegpt_prune(
            weight,
            statistics.gram,
            sparsity,
            structure.n,
            structure.m,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
        )
        weight.copy_(new_weight)
        return keep

    def shard_local(self, structure: SparsityStructure) -> bool:
        # Rows are updated independently, but the unstructured mask is chosen over all rows of each column block.
        return structure.is_n_m

    def __repr__(self) -> str:
        return f"SparseGPT(blocksize={self.blocksize}, percdamp={self.percdamp})"


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
        if not isinstance(statistics, InputNormStatistics):
            raise TypeError("RIA needs InputNormStatistics from calibration")
        magnitude = weight.abs().float()  # (out, in)
        tiny = torch.finfo(torch.float32).tiny
        relative = magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
        relative += magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
        norms = statistics.mean_sq_norm.sqrt().to(weight.device).pow(self.a)  # (in,)
        return relative * norms.unsqueeze(0)

    def describe(self) -> str:
        return f"ria (a={self.a:g}, permuted channels)" if self.permute_channels else f"ria (a={self.a:g})"

    def __repr__(self) -> str:
        return f"RIA(a={self.a}, permute_channels=True)" if self.permute_channels else f"RIA(a={self.a})"


_REGISTRY: dict[str, Callable[..., PruningMethod]] = {}


def register_method(name: str, factory: Callable[..., PruningMethod]) -> None:
    """Makes ``method=name`` available to :func:`~wanda_lightning.prune`.

    Example::

        class Random(PruningMethod):
            name = "random"
            requires_calibration = False
            def score(self, weight, statistics):
                return torch.rand(weight.shape)

        register_method("random", Random)
        prune(model, None, method="random")
    """
    _REGISTRY[name.lower()] = factory


def available_methods() -> list[str]:
    """Registered method names."""
    return sorted(_REGISTRY)


def get_method(method: str | PruningMethod, **options: object) -> PruningMethod:
    """Resolves a method name (with options for its constructor) or passes an instance through.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        TypeError: For anything that is neither a string nor a :class:`PruningMethod`.

    Example::

        >>> get_method("wanda", variant=True)
        Wanda(variant=True)
    """
    if isinstance(method, PruningMethod):
        if options:
            raise ValueError(f"method options {sorted(options)} given with a method instance {method!r}")
        return method
    if not isinstance(method, str):
        raise TypeError(f"`method` must be a method name or a PruningMethod, got {method!r}")
    factory = _REGISTRY.get(method.lower())
    if factory is None:
        raise ValueError(f"`method` must be one of {available_methods()}, got {method!r}")
    return factory(**options)


register_method("wanda", Wanda)
register_method("magnitude", Magnitude)
register_method("sparsegpt", SparseGPT)
register_method("ria", RIA)
register_method("ria-permuted", lambda **options: RIA(permute_channels=True, **options))
