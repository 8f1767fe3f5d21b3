"""Shrinking: remove whole MLP hidden units and attention heads (and, through :mod:`~wanda_lightning.depth`, whole
blocks), so the model is a smaller dense model that runs faster everywhere; or reach a speed-up measured where the
model runs (:mod:`.speedup`, its timings smoothed by :mod:`.cost_model`). :func:`shrink` plans uniform widths the
model's config can express (:mod:`.hf_config`), finds each block's unit groups (:mod:`.groups`), scores units
(:mod:`.methods`) in the calibration pipeline (:mod:`.action`), cuts the layers in place (:mod:`.surgery`) and reports
(:mod:`.report`)."""

from .api import ShrinkPlan, plan_shrink, shrink, shrink_with
from .config import ShrinkConfig
from .cost_model import fit_token_cost
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
from .speed_target import SpeedTarget
from .speedup import Candidate, calibration_loss, search_speedup
from .surgery import fit_to_state_dict

__all__ = [
    "FLAP",
    "WIDTH_METHODS",
    "Candidate",
    "GroupReport",
    "MagnitudeSP",
    "ShrinkConfig",
    "ShrinkPlan",
    "ShrinkReport",
    "SpeedTarget",
    "UnitGroup",
    "WandaSP",
    "WidthMethod",
    "available_width_methods",
    "calibration_loss",
    "find_unit_groups",
    "fit_to_state_dict",
    "fit_token_cost",
    "get_width_method",
    "plan_shrink",
    "register_width_method",
    "search_speedup",
    "shrink",
    "shrink_with",
]
