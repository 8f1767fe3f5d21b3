"""Depth pruning: remove whole blocks (decoder layers), the ones that change their input least on the calibration
data. :mod:`.scores` measures blocks (pure torch), :mod:`.surgery` removes them and rewrites the config, :mod:`.api`
runs both through the calibration pipeline for ``shrink(layers=...)``."""

from .api import DepthPlan, DepthResult, plan_depth, prune_depth
from .scores import LAYER_SCORES, DepthScorer, LayerScore, choose_blocks, token_cosines, token_distances
from .surgery import PER_LAYER_KEYS, check_removable, remove_blocks

__all__ = [
    "LAYER_SCORES",
    "PER_LAYER_KEYS",
    "DepthPlan",
    "DepthResult",
    "DepthScorer",
    "LayerScore",
    "check_removable",
    "choose_blocks",
    "plan_depth",
    "prune_depth",
    "remove_blocks",
    "token_cosines",
    "token_distances",
]
