"""Shrinking: remove whole MLP hidden units and attention heads (and, through :mod:`~wanda_lightning.depth`, whole
blocks), so the model is a smaller dense model that runs faster everywhere; or reach a speed-up measured where the
model runs (:mod:`.speedup`, its timings smoothed by :mod:`.cost_model`). :func:`shrink` plans uniform widths the
model's config can express (:mod:`.hf_config`), finds each block's unit groups (:mod:`.groups`), scores units
(:mod:`.methods`) in the calibration pipeline (:mod:`.action`), cuts the layers in place (:mod:`.surgery`) and reports
(:mod:`.report`). What the Lightning callback and the command line use of shrinking is exported here."""

from ..depth.scores import LayerScore
from .api import ShrinkPlan, plan_shrink, shrink, shrink_with
from .config import ShrinkConfig, Widths
from .cost_model import fit_token_cost
from .groups import UnitGroup, find_unit_groups
from .hf_config import sync_config
from .methods import (
    FLAP,
    WIDTH_METHODS,
    MagnitudeSP,
    Update,
    WandaSP,
    WidthMethod,
    WidthMethodName,
    available_width_methods,
    get_width_method,
    register_width_method,
)
from .report import GroupReport, ShrinkReport
from .saving import save_plain_pretrained
from .speed_target import SpeedTarget
from .speedup import Candidate, calibration_loss, search_speedup
from .surgery import fit_to_state_dict

__all__ = [
    "FLAP",
    "WIDTH_METHODS",
    "Candidate",
    "GroupReport",
    "LayerScore",
    "MagnitudeSP",
    "ShrinkConfig",
    "ShrinkPlan",
    "ShrinkReport",
    "SpeedTarget",
    "UnitGroup",
    "Update",
    "WandaSP",
    "WidthMethod",
    "WidthMethodName",
    "Widths",
    "available_width_methods",
    "calibration_loss",
    "find_unit_groups",
    "fit_to_state_dict",
    "fit_token_cost",
    "get_width_method",
    "plan_shrink",
    "register_width_method",
    "save_plain_pretrained",
    "search_speedup",
    "shrink",
    "shrink_with",
    "sync_config",
]
