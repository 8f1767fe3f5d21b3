"""Depth pruning inside ``shrink()``: plan which stack loses how many blocks (checked before anything changes), then
score every block on the calibration data in one dense pass of the calibration pipeline and remove the chosen ones.

Example::

    plan = plan_depth(model, 0.2, options)             # 6 of 30 blocks; refuses what cannot be expressed
    run = prepare_calibration(model, plan.layers, batches, options, plan.blocks, needed_by="`layers`")
    result = prune_depth(run.pipeline, run.batches, plan, "influence")
    result.removed                                     # [22, 23, 24, 25, 26, 27], say
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.blocks import BlockStack
from ..core.layers import find_pretrained
from ..core.options import CalibrationOptions
from ..core.pipeline import CalibrationPipeline
from ..core.runner import BlockPlan, choose_block_stack
from ..core.target_layer import TargetLayer
from ..core.targets import find_targets
from ..core.validation import units_to_remove
from .scores import DepthScorer, choose_blocks
from .surgery import check_removable, remove_blocks

__all__ = ["DepthPlan", "DepthResult", "plan_depth", "prune_depth"]


@dataclass
class DepthPlan:
    """Which stack loses how many blocks, checked.

    Attributes:
        stack: The block stack.
        count: Blocks to remove.
        layers: The model's target layers (they locate the stack for the pipeline).
        config: The transformers config rewritten afterwards, or ``None``.
    """

    stack: BlockStack
    count: int
    layers: list[TargetLayer]
    config: Any | None

    @property
    def blocks(self) -> BlockPlan:
        """The stack, walked block by block."""
        return BlockPlan(self.stack, True)


@dataclass
class DepthResult:
    """What depth pruning did.

    Attributes:
        removed: Indices of the removed blocks in the original stack, increasing.
        scores: The score of every block (``"influence"``) or of every run start (``"angular"``).
        config_updates: Config entries rewritten (``num_hidden_layers``, ``layer_types``).
    """

    removed: list[int]
    scores: list[float]
    config_updates: dict[str, Any] = field(default_factory=dict)


def plan_depth(model: nn.Module, fraction: float, options: CalibrationOptions) -> DepthPlan:
    """Finds the block stack (``options.blocks`` or the one found), the number of blocks ``fraction`` removes (rounded
    to the nearest whole block) and checks that the config can describe the shorter model.

    Raises:
        ValueError: Naming ``layers`` and why, before anything changes.
    """
    layers, _ = find_targets(model)
    stack = choose_block_stack(model, layers, options, sequential=True).stack
    if stack is None:
        raise ValueError(
            f"`layers`={fraction:g}: {type(model).__name__} has no stack of repeated blocks to remove blocks from; "
            "name it with `blocks`"
        )
    count = units_to_remove(fraction, len(stack.blocks), "layers", f"the block stack `{stack.name}`", "block")
    found = find_pretrained(model)
    config = found[0].config if found is not None else None
    try:
        check_removable(model, stack, config)
    except ValueError as error:
        raise ValueError(f"`layers`={fraction:g}: {error}") from None
    return DepthPlan(stack, count, layers, config)


def prune_depth(pipeline: CalibrationPipeline, batches: list[Any], plan: DepthPlan, score: str) -> DepthResult:
    """Scores every block of ``plan.stack`` in one dense pass (:class:`~wanda_lightning.depth.scores.DepthScorer`,
    summed across processes so that every process removes the same blocks), removes the ``plan.count`` chosen ones
    and rewrites the config."""
    span = 1 if score == "influence" else plan.count
    scorer = DepthScorer(len(plan.stack.blocks), span, score)
    pipeline.trace(batches, scorer.observe)
    if pipeline.sync_statistics is not None:
        pipeline.sync_statistics([scorer.sums, scorer.counts])
    scores = scorer.scores()
    removed = choose_blocks(scores, plan.count, score)
    updates = remove_blocks(pipeline.model, plan.stack, removed, plan.config)
    return DepthResult(removed, [float(s) for s in scores], updates)
