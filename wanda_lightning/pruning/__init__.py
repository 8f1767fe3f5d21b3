"""Mask pruning: :func:`prune` validates a :class:`PruneConfig`, runs the calibration pipeline with the
:class:`MaskAction` (score, select, mask, refine) and returns a :class:`PruningReport`; :func:`prune_with` runs a
configuration made beforehand and returns a :class:`PruneResult` (report, layers and masks). What the Lightning
callbacks use of mask pruning is exported here."""

from .action import MaskAction, check_keeps_pruned
from .api import PrunePlan, plan_prune, prune, prune_with
from .config import PruneConfig
from .report import LayerReport, PruneResult, PruningReport, SkippedLayer

__all__ = [
    "LayerReport",
    "MaskAction",
    "PruneConfig",
    "PrunePlan",
    "PruneResult",
    "PruningReport",
    "SkippedLayer",
    "check_keeps_pruned",
    "plan_prune",
    "prune",
    "prune_with",
]
