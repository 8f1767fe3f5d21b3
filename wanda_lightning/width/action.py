"""Remove units: the pipeline action behind ``shrink()``."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from ..core.collector import StatisticsFactory
from ..core.pipeline import Action, Step
from ..core.statistics import GramStatistics, LayerStatistics, MomentStatistics
from ..core.target_layer import TargetLayer
from .groups import UnitGroup
from .methods import WidthMethod, unit_scores
from .report import GroupReport, ShrinkReport
from .surgery import add_to_bias, remove_units
from .updates import bias_compensation, least_squares_refit

__all__ = ["ShrinkAction", "choose_units"]


def choose_units(scores: Tensor, keep: int) -> Tensor:
    """The ``keep`` highest-scoring units, as sorted indices (ties keep the lower index).

    Example::

        >>> choose_units(torch.tensor([3.0, 1.0, 3.0, 2.0]), 2).tolist()
        [0, 2]
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


class ShrinkAction(Action):
    """Scores each group's units from its consumer's weight and input statistics, keeps the best, and removes the rest
    from the group's producers and consumer (with bias compensation when the method asks for it).

    Args:
        method: The width method.
        groups: The unit groups, by consumer name.
        keep: Units kept per group, by consumer name.
        report: Filled as groups shrink.
        bias_layers: Layers that gain a zero bias (a config bias flag gives them one).
        biased: Unit kinds whose consumers may carry a new bias (for the method's ``update``).
    """

    verb = "shrunk"

    def __init__(
        self,
        method: WidthMethod,
        groups: Mapping[str, UnitGroup],
        keep: Mapping[str, int],
        report: ShrinkReport,
        bias_layers: set[str] | None = None,
        biased: set[str] | None = None,
    ) -> None:
        self.method = method
        self.groups = dict(groups)
        self.keep = dict(keep)
        self.report = report
        self.bias_layers = bias_layers or set()
        self.biased = biased if biased is not None else {"mlp", "attention"}

    @property
    def needs_data(self) -> bool:
        return self.method.needs_data

    def statistics(self, layer: TargetLayer) -> Mapping[str, StatisticsFactory]:
        return {"method": self.method.new_statistics}

    def apply(self, step: Step) -> None:
        for layer in step.layers:
            start = time.perf_counter()
            group, statistics = self.groups[layer.name], step.take(layer.name).get("method")
            scores = self.unit_scores(group, layer, statistics)
            self.remove(group, layer, statistics, choose_units(scores, self.keep[layer.name]))
            self.report.scoring_seconds += time.perf_counter() - start

    def reconstructed(self, step: Step) -> list[tuple[torch.nn.Parameter, Tensor | None]]:
        """Every layer of the step's groups, producers and consumer: their kept weights and biases."""
        return [
            (p, None)
            for layer in step.layers
            for member in self.groups[layer.name].members
            for p in member.module.parameters(recurse=False)
        ]

    @torch.no_grad()
    def unit_scores(self, group: UnitGroup, layer: TargetLayer, statistics: LayerStatistics | None) -> Tensor:
        """``(units,)`` float32 scores of a group's units."""
        scores = self.method.channel_scores(layer.weight_2d, statistics)  # (in,)
        if not bool(torch.isfinite(scores).all()):
            raise FloatingPointError(f"layer {layer.name!r}: the unit scores contain NaN or Inf")
        return unit_scores(scores, group.consumer.per_unit)

    @torch.no_grad()
    def remove(self, group: UnitGroup, layer: TargetLayer, statistics: LayerStatistics | None, keep: Tensor) -> None:
        """Keeps the units ``keep`` (sorted indices) of ``group`` and removes the others; then updates the consumer's
        kept weights as the method asks (see :mod:`~wanda_lightning.width.updates`)."""
        dense = layer.weight_2d.float().clone() if self.method.update != "none" else None  # (out, in)
        units_before, width_before = group.num_units, group.consumer.per_unit * group.num_units
        kept = group.consumer.channels(keep)
        remove_units(group, keep)
        for member in group.members:
            if member.name in self.bias_layers:
                add_to_bias(member.module)
        update = "none" if dense is None else self._update(group, layer, statistics, dense, kept)
        self.report.groups.append(
            GroupReport(
                name=group.consumer.name,
                kind=group.kind,
                block=group.block,
                units_before=units_before,
                units_after=group.num_units,
                width_before=width_before,
                width_after=group.consumer.per_unit * group.num_units,
                update=update,
                head_dim=group.head_dim,
                kept_units=keep.tolist(),
            )
        )

    def _update(
        self, group: UnitGroup, layer: TargetLayer, statistics: LayerStatistics | None, dense: Tensor, kept: Tensor
    ) -> str:
        """Updates the (already cut) consumer from its ``dense`` weights; returns what was done."""
        if not isinstance(statistics, MomentStatistics):
            raise TypeError(f"{self.method.describe()} needs the inputs' means (MomentStatistics) for its update")
        consumer = group.consumer.module
        removed_mask = torch.ones(dense.shape[1], dtype=torch.bool, device=dense.device)
        removed_mask[kept.to(dense.device)] = False
        removed = torch.nonzero(removed_mask).flatten()
        fit_bias = group.kind in self.biased
        if self.method.update == "least-squares":
            if not isinstance(statistics, GramStatistics):
                raise TypeError("the least-squares update needs the input Gram matrix (GramStatistics)")
            try:
                weights, change = least_squares_refit(
                    dense, statistics.gram, statistics.sum, statistics.num_tokens, kept, fit_bias=fit_bias
                )
            except torch.linalg.LinAlgError as error:
                warnings.warn(
                    f"layer {group.consumer.name!r}: {error}; its kept weights stay as they were"
                    + (" and the removed units' mean contribution goes into its bias" if fit_bias else ""),
                    stacklevel=2,
                )
            else:
                target = TargetLayer(group.consumer.name, consumer, transposed=layer.transposed).weight_2d
                target.copy_(weights.to(target.dtype))
                if change is not None:
                    add_to_bias(consumer, change)
                return "least-squares" if fit_bias else "least-squares (weights)"
        if not fit_bias:
            return "none"
        add_to_bias(consumer, bias_compensation(dense, statistics.mean, removed))
        return "bias"


def adaptive_counts(scores: Mapping[str, Tensor], remove: int) -> dict[str, int]:
    """FLAP's adaptive widths: units kept per group when the ``remove`` units with the lowest standardised scores go,
    ranked across all groups (each group's scores standardised by their own mean and standard deviation); every group
    keeps at least one unit.

    Args:
        scores: ``(units,)`` scores per group.
        remove: Units to remove in all.

    Example::

        >>> counts = adaptive_counts({"a": torch.tensor([1.0, 2.0, 9.0]), "b": torch.tensor([5.0, 6.0, 7.0])}, 2)
        >>> counts
        {'a': 2, 'b': 2}
    """
    names = list(scores)
    standardised = []
    for name in names:
        values = scores[name].float()
        spread = values.std() if values.numel() > 1 else values.new_tensor(0.0)
        z = (values - values.mean()) / spread if float(spread) > 0 else torch.zeros_like(values)
        best = int(torch.argmax(values))  # never removed: every group keeps a unit
        z[best] = float("inf")
        standardised.append(z)
    owner = torch.cat([torch.full((z.numel(),), i) for i, z in enumerate(standardised)])
    flat = torch.cat(standardised)
    order = torch.sort(flat, stable=True).indices[:remove]
    removed = torch.bincount(owner[order], minlength=len(names))
    return {name: scores[name].numel() - int(removed[i]) for i, name in enumerate(names)}


class AdaptiveShrinkAction(ShrinkAction):
    """:class:`ShrinkAction` with per-layer widths: with every group's statistics at hand (one-shot calibration), the
    units to remove of each kind are chosen across all layers by standardised score (:func:`adaptive_counts`). The
    other arguments are :class:`ShrinkAction`'s; ``keep`` is filled in :meth:`apply`.

    Args:
        remove: Units to remove per kind, over all layers (``{"mlp": 23040}``).
    """

    def __init__(
        self,
        method: WidthMethod,
        groups: Mapping[str, UnitGroup],
        remove: Mapping[str, int],
        report: ShrinkReport,
        bias_layers: set[str] | None = None,
        biased: set[str] | None = None,
    ) -> None:
        super().__init__(method, groups, {}, report, bias_layers, biased)
        self.remove_per_kind = dict(remove)

    def apply(self, step: Step) -> None:
        start = time.perf_counter()
        statistics = {layer.name: step.take(layer.name).get("method") for layer in step.layers}
        scores = {
            layer.name: self.unit_scores(self.groups[layer.name], layer, statistics[layer.name])
            for layer in step.layers
        }
        for kind, count in self.remove_per_kind.items():
            of_kind = {name: s for name, s in scores.items() if self.groups[name].kind == kind}
            self.keep.update(adaptive_counts(of_kind, count))
        for layer in step.layers:
            keep = choose_units(scores[layer.name], self.keep[layer.name])
            self.remove(self.groups[layer.name], layer, statistics[layer.name], keep)
        self.report.scoring_seconds += time.perf_counter() - start
