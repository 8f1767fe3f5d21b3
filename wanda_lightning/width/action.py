"""Remove units: the pipeline action behind ``shrink()``."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor

from ..core.collector import StatisticsFactory
from ..core.pipeline import Action, Step
from ..core.statistics import LayerStatistics, MomentStatistics
from ..core.targets import TargetLayer
from .groups import UnitGroup
from .methods import WidthMethod, unit_scores
from .report import GroupReport, ShrinkReport
from .surgery import add_to_bias, remove_units

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
        keep: Units kept per group kind (``{"mlp": 768}``).
        report: Filled as groups shrink.
        bias_layers: Layers that gain a zero bias (a config bias flag gives them one).
    """

    verb = "shrunk"

    def __init__(
        self,
        method: WidthMethod,
        groups: Mapping[str, UnitGroup],
        keep: Mapping[str, int],
        report: ShrinkReport,
        bias_layers: set[str] | None = None,
    ) -> None:
        self.method = method
        self.groups = dict(groups)
        self.keep = dict(keep)
        self.report = report
        self.bias_layers = bias_layers or set()

    @property
    def needs_data(self) -> bool:
        return self.method.requires_calibration

    def statistics(self, layer: TargetLayer) -> Mapping[str, StatisticsFactory]:
        return {"method": self.method.new_statistics}

    def apply(self, step: Step) -> None:
        for layer in step.layers:
            start = time.perf_counter()
            self._shrink(self.groups[layer.name], layer, step.take(layer.name).get("method"))
            self.report.scoring_seconds += time.perf_counter() - start

    @torch.no_grad()
    def _shrink(self, group: UnitGroup, layer: TargetLayer, statistics: LayerStatistics | None) -> None:
        weight = layer.weight_2d  # (out, in) view of the consumer
        scores = self.method.channel_scores(weight, statistics)  # (in,)
        if not bool(torch.isfinite(scores).all()):
            raise FloatingPointError(f"layer {layer.name!r}: the unit scores contain NaN or Inf")
        units_before, width_before = group.num_units, group.consumer.per_unit * group.num_units
        keep = choose_units(unit_scores(scores, group.consumer.per_unit), self.keep[group.kind])
        delta: Tensor | None = None
        if self.method.compensate:
            if not isinstance(statistics, MomentStatistics):
                raise TypeError(f"{self.method.describe()} compensation needs the inputs' means (MomentStatistics)")
            dropped = torch.ones(group.num_units, dtype=torch.bool, device=keep.device)
            dropped[keep] = False
            removed = group.consumer.channels(torch.nonzero(dropped).flatten())
            mean = statistics.mean.to(weight.device)
            delta = weight.float()[:, removed] @ mean[removed]  # (out,): the removed inputs' mean contribution
        remove_units(group, keep)
        for member in group.members:
            if member.name in self.bias_layers:
                add_to_bias(member.module)
        if delta is not None:
            add_to_bias(group.consumer.module, delta)
        self.report.groups.append(
            GroupReport(
                name=group.consumer.name,
                kind=group.kind,
                block=group.block,
                units_before=units_before,
                units_after=group.num_units,
                width_before=width_before,
                width_after=group.consumer.per_unit * group.num_units,
                compensated=delta is not None,
                head_dim=group.head_dim,
                kept_units=keep.tolist(),
            )
        )
