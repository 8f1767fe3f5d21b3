"""How width pruning ranks units: a :class:`WidthMethod` scores every input channel of a group's consumer layer from
its weight and calibration statistics; a unit's score is the sum over its channels.

- ``"wanda-sp"`` (:class:`WandaSP`): ``sum_i |W_ic| * ||X_c||``, Wanda's score summed over the weights that read
  channel ``c`` (Wanda-sp, as named in the FLAP paper).
- ``"flap"`` (:class:`FLAP`, An et al., AAAI 2024): the fluctuation of the channel's input over calibration tokens
  times the squared norm of its weight column, ``var(X_c) * ||W_:c||^2``; with bias compensation: the removed
  channels' mean contribution ``W_:R mean(X_R)`` is added to the consumer's bias.
- ``"magnitude-sp"`` (:class:`MagnitudeSP`): ``sum_i |W_ic|``, the data-free baseline.

A method also says what happens to the consumer's kept weights (``update``, see :mod:`.updates`): nothing
(``"none"``), bias compensation (``"bias"``, FLAP's default) or a least-squares refit (``"least-squares"``).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from ..core.registry import Registry
from ..core.statistics import GramStatistics, InputNormStatistics, LayerStatistics, MomentStatistics, expect_statistics
from .updates import UPDATES

__all__ = [
    "FLAP",
    "WIDTH_METHODS",
    "MagnitudeSP",
    "Update",
    "WandaSP",
    "WidthMethod",
    "WidthMethodName",
    "available_width_methods",
    "get_width_method",
    "register_width_method",
    "unit_scores",
]

WidthMethodName = Literal["wanda-sp", "flap", "magnitude-sp"]
WIDTH_METHODS: tuple[str, ...] = get_args(WidthMethodName)
Update = Literal["none", "bias", "least-squares"]


def _checked(update: str) -> str:
    if update not in UPDATES:
        raise ValueError(f"`update` must be one of {list(UPDATES)}, got {update!r}")
    return update


def unit_scores(channel_scores: Tensor, per_unit: int) -> Tensor:
    """Sums ``(channels,)`` scores over runs of ``per_unit`` consecutive channels: one score per unit.

    Example::

        >>> unit_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2).tolist()
        [3.0, 7.0]
    """
    return channel_scores.float().reshape(-1, per_unit).sum(dim=1)


class WidthMethod(ABC):
    """Base class of width-pruning methods.

    Attributes:
        name: The method's name.
        requires_calibration: Whether scores need data (``False``: calibration is skipped unless ``update`` needs it).
        statistics_class: What scores need: ``None``, :class:`InputNormStatistics` or :class:`MomentStatistics`.
        update: What happens to the consumer's kept weights: ``"none"``, ``"bias"`` or ``"least-squares"``; the class's
            value is the default of the ``update`` argument.

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
    statistics_class: ClassVar[type[InputNormStatistics] | None] = None
    update: str = "none"

    def __init__(self, update: Update | None = None) -> None:
        """Sets :attr:`update` (``None``: the class's).

        Raises:
            ValueError: For an unknown update.
        """
        self.update = _checked(type(self).update if update is None else update)

    @property
    def needs_data(self) -> bool:
        """Whether calibration batches are needed (for the scores or for the update)."""
        return self.requires_calibration or self.update != "none"

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics | None:
        """A fresh accumulator for a consumer with ``in_features`` inputs: what the scores and the update need
        (:class:`GramStatistics` holds everything the others do), or ``None``."""
        if self.update == "least-squares":
            return GramStatistics(in_features, device)
        if self.update == "bias":
            return MomentStatistics(in_features, device)
        return self.statistics_class(in_features, device) if self.statistics_class is not None else None

    @abstractmethod
    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        """Importance of every input channel of the consumer.

        Args:
            weight: The consumer's ``(out_features, in_features)`` weight.
            statistics: What :meth:`new_statistics` returned, after calibration.

        Returns:
            ``(in_features,)`` float32 scores; higher means more important.
        """

    def with_update(self, update: str) -> WidthMethod:
        """A copy with another ``update``.

        Raises:
            ValueError: For an unknown update.

        Example::

            >>> WandaSP().with_update("least-squares").describe()
            'wanda-sp (least-squares update)'
        """
        method = copy.copy(self)
        method.update = _checked(update)
        return method

    def describe(self) -> str:
        """Short human-readable name, including options."""
        default = type(self).update
        return self.name if self.update == default else f"{self.name} ({self.update} update)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(update={self.update!r})"


class WandaSP(WidthMethod):
    """Wanda-sp: ``sum_i |W_ic| * ||X_c||`` over the consumer's weights that read channel ``c``.

    Example::

        >>> stats = InputNormStatistics(2, torch.device("cpu"))
        >>> stats.update(torch.tensor([[1.0, 2.0]]), None, num_sequences=1)
        >>> WandaSP().channel_scores(torch.tensor([[1.0, -1.0], [2.0, 0.5]]), stats).tolist()
        [3.0, 3.0]
    """

    name = "wanda-sp"
    statistics_class = InputNormStatistics

    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        mean_sq_norm = expect_statistics(statistics, InputNormStatistics, "wanda-sp").mean_sq_norm
        norms = mean_sq_norm.sqrt().to(weight.device)  # (in,)
        return weight.abs().float().sum(dim=0) * norms


class FLAP(WidthMethod):
    """FLAP's fluctuation metric ``var(X_c) * ||W_:c||^2``, with bias compensation by default.

    Args:
        update: ``"bias"`` (default, FLAP's: the removed channels' mean contribution ``W_:R mean(X_R)`` goes into the
            consumer's bias; a model whose config cannot hold that bias, say Qwen2's ``o_proj``, is refused),
            ``"none"`` or ``"least-squares"`` (see :mod:`~wanda_lightning.width.updates`).

    Example::

        >>> FLAP().describe(), FLAP(update="none").describe()
        ('flap', 'flap (none update)')
    """

    name = "flap"
    statistics_class = MomentStatistics
    update = "bias"

    def channel_scores(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        variance = expect_statistics(statistics, MomentStatistics, "flap").variance.to(weight.device)  # (in,)
        return weight.float().square().sum(dim=0) * variance


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


_WIDTH_METHODS: Registry[WidthMethod] = Registry(WidthMethod, "method", "width method")


def register_width_method(name: str, factory: Callable[..., WidthMethod]) -> None:
    """Makes ``method=name`` available to :func:`~wanda_lightning.shrink`."""
    _WIDTH_METHODS.register(name, factory)


def available_width_methods() -> list[str]:
    """Registered width method names.

    Example::

        >>> available_width_methods()
        ['flap', 'magnitude-sp', 'wanda-sp']
    """
    return _WIDTH_METHODS.available()


def get_width_method(method: str | WidthMethod) -> WidthMethod:
    """Resolves a width method name or passes an instance through.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        TypeError: For anything else.

    Example::

        >>> get_width_method("flap")
        FLAP(update='bias')
    """
    return _WIDTH_METHODS.get(method)


register_width_method("wanda-sp", WandaSP)
register_width_method("flap", FLAP)
register_width_method("magnitude-sp", MagnitudeSP)
