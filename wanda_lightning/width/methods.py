"""How width pruning ranks units: a :class:`WidthMethod` scores every input channel of a group's consumer layer from
its weight and calibration statistics; a unit's score is the sum over its channels.

- ``"wanda-sp"`` (:class:`WandaSP`): ``sum_i |W_ic| * ||X_c||``, Wanda's score summed over the weights that read
  channel ``c`` (Wanda-sp, as named in the FLAP paper).
- ``"flap"`` (:class:`FLAP`, An et al., AAAI 2024): the fluctuation of the channel's input over calibration tokens
  times the squared norm of its weight column, ``var(X_c) * ||W_:c||^2``; with bias compensation: the removed
  channels' mean contribution ``W_:R mean(X_R)`` is added to the consumer's bias.
- ``"magnitude-sp"`` (:class:`MagnitudeSP`): ``sum_i |W_ic|``, the data-free baseline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from ..core.statistics import InputNormStatistics, LayerStatistics, MomentStatistics

__all__ = [
    "FLAP",
    "WIDTH_METHODS",
    "MagnitudeSP",
    "WandaSP",
    "WidthMethod",
    "WidthMethodName",
    "get_width_method",
    "register_width_method",
    "unit_scores",
]

WidthMethodName = Literal["wanda-sp", "flap", "magnitude-sp"]
WIDTH_METHODS: tuple[str, ...] = get_args(WidthMethodName)


def unit_scores(channel_scores: Tensor, per_unit: int) -> Tensor:
    """Sums ``(channels,)`` scores over runs of ``per_unit`` consecutive channels: one score per unit.

    Example::

        >>> unit_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2).tolist()
        [3.0, 7.0]
    """
    return channel_scores.float().reshape(-1, per_unit).sum(dim=1)


class WidthMethod(ABC):
    """Base class of width-pruning methods.

    Example::

        >>> class L2(WidthMethod):
        ...     name = "l2-sp"
        ...     requires_calibration = False
        ...     def channel_scores(self, weight, statistics):
        ...         return weight.float().square().sum(dim=0)
        >>> L2().channel_scores(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), None).tolist()
        [25.0, 1.0]
    """

    name: ClassVar[str]
    requires_calibration: ClassVar[bool] = True
    #: Add the removed channels' mean contribution to the consumer's bias (needs the inputs' means).
    compensate: bool = False

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics | None:
        """A fresh accumulator for a consumer with ``in_features`` inputs, or ``None`` when no data is needed."""
        return None

    @abstractmethod
    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        """Importance of every input channel of the consumer.

        Args:
            weight: The consumer's ``(out_features, in_features)`` weight.
            statistics: What :meth:`new_statistics` returned, after calibration.

        Returns:
            ``(in_features,)`` float32 scores; higher means more important.
        """

    def describe(self) -> str:
        """Short human-readable name, including options."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WandaSP(WidthMethod):
    """Wanda-sp: ``sum_i |W_ic| * ||X_c||`` over the consumer's weights that read channel ``c``.

    Example::

        >>> stats = InputNormStatistics(2, torch.device("cpu"))
        >>> stats.update(torch.tensor([[1.0, 2.0]]), None, num_sequences=1)
        >>> WandaSP().channel_scores(torch.tensor([[1.0, -1.0], [2.0, 0.5]]), stats).tolist()
        [3.0, 3.0]
    """

    name = "wanda-sp"

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return InputNormStatistics(in_features, device)

    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        if not isinstance(statistics, InputNormStatistics):
            raise TypeError("wanda-sp needs InputNormStatistics from calibration")
        norms = statistics.mean_sq_norm.sqrt().to(weight.device)  # (in,)
        return weight.abs().float().sum(dim=0) * norms


class FLAP(WidthMethod):
    """FLAP's fluctuation metric ``var(X_c) * ||W_:c||^2``, with bias compensation.

    Args:
        compensate: Add the removed channels' mean contribution ``W_:R mean(X_R)`` to the consumer's bias (default
            True). A model whose config cannot express that bias (say, Qwen2's ``o_proj``) is refused with
            ``compensate=True``.

    Example::

        >>> FLAP().describe(), FLAP(compensate=False).describe()
        ('flap', 'flap (no compensation)')
    """

    name = "flap"

    def __init__(self, compensate: bool = True) -> None:
        if not isinstance(compensate, bool):
            raise TypeError(f"`compensate` must be True or False, got {compensate!r}")
        self.compensate = compensate

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return MomentStatistics(in_features, device)

    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        if not isinstance(statistics, MomentStatistics):
            raise TypeError("flap needs MomentStatistics from calibration")
        variance = statistics.variance.to(weight.device)  # (in,)
        return weight.float().square().sum(dim=0) * variance

    def describe(self) -> str:
        return "flap" if self.compensate else "flap (no compensation)"

    def __repr__(self) -> str:
        return f"FLAP(compensate={self.compensate})"


class MagnitudeSP(WidthMethod):
    """The data-free baseline: ``sum_i |W_ic|``.

    Example::

        >>> MagnitudeSP().channel_scores(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), None).tolist()
        [3.0, 3.5]
    """

    name = "magnitude-sp"
    requires_calibration = False

    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        return weight.abs().float().sum(dim=0)


_REGISTRY: dict[str, Callable[..., WidthMethod]] = {"wanda-sp": WandaSP, "flap": FLAP, "magnitude-sp": MagnitudeSP}


def register_width_method(name: str, factory: Callable[..., WidthMethod]) -> None:
    """Makes ``method=name`` available to :func:`~wanda_lightning.shrink`."""
    _REGISTRY[name.lower()] = factory


def get_width_method(method: str | WidthMethod) -> WidthMethod:
    """Resolves a width method name or passes an instance through.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        TypeError: For anything else.

    Example::

        >>> get_width_method("flap")
        FLAP(compensate=True)
    """
    if isinstance(method, WidthMethod):
        return method
    if not isinstance(method, str):
        raise TypeError(f"`method` must be a width method name or a WidthMethod, got {method!r}")
    factory = _REGISTRY.get(method.lower())
    if factory is None:
        raise ValueError(f"`method` must be one of {sorted(_REGISTRY)}, got {method!r}")
    return factory()
