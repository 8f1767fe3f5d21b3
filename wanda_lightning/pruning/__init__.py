"""Mask pruning: :func:`prune` validates a :class:`PruneConfig`, runs the calibration pipeline with the
:class:`MaskAction` (score, select, mask, refine) and returns a :class:`PruningReport`."""

from .action import MaskAction
from .api import prune, prune_with
from .config import PruneConfig
from .report import LayerReport, PruningReport, SkippedLayer

__all__ = ["LayerReport", "MaskAction", "PruneConfig", "PruningReport", "SkippedLayer", "prune", "prune_with"]
