"""Width pruning: remove whole MLP hidden units and attention heads, so the model is a smaller dense model that runs
faster everywhere. :func:`shrink` plans uniform widths the model's config can express (:mod:`.hf_config`), finds
each block's unit groups (:mod:`.groups`), scores units (:mod:`.methods`) in the calibration pipeline
(:mod:`.action`), cuts the layers in place (:mod:`.surgery`) and reports (:mod:`.report`)."""

from .api import ShrinkPlan, plan_shrink, shrink, shrink_with
from .config import ShrinkConfig
from .groups import UnitGroup, find_unit_groups
from .methods import (
    FLAP,
    WIDTH_METHODS,
    MagnitudeSP,
    WandaSP,
    WidthMethod,
    available_width_methods,
    get_width_method,
    register_width_method,
)
from .report import GroupReport, ShrinkReport
from .surgery import fit_to_state_dict

__all__ = [
    "FLAP",
    "WIDTH_METHODS",
    "GroupReport",
    "MagnitudeSP",
    "ShrinkConfig",
    "ShrinkPlan",
    "ShrinkReport",
    "UnitGroup",
    "WandaSP",
    "WidthMethod",
    "available_width_methods",
    "find_unit_groups",
    "fit_to_state_dict",
    "get_width_method",
    "plan_shrink",
    "register_width_method",
    "shrink",
    "shrink_with",
]
