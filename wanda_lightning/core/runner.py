"""The one run sequence of every calibrated call, from one :class:`~wanda_lightning.core.options.CalibrationOptions`:
the block stack and whether to calibrate block by block (:func:`choose_block_stack`), then the prepared batches and
the :class:`~wanda_lightning.core.pipeline.CalibrationPipeline` (:func:`prepare_calibration`), then the action run
over them with its report filled (:func:`run_action`).

``prune_with`` and ``shrink_with`` both go through it; what only one of them needs (checkpoint streaming, FSDP checks,
unit plans) stays with it, before the run.

Example::

    blocks = choose_block_stack(model, layers, options)
    run = prepare_calibration(model, layers, batches, options, blocks, needed_by="wanda")
    run_action(run, action, report, needs_data=True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from ..distributed.sharding import ShardedLayout, same_count_on_every_rank
from ..distributed.streaming import SafetensorsCheckpoint
from .batches import ForwardFn, batch_size_of, prepare_batches
from .blocks import BlockStack, find_block_stack
from .calibration_record import CalibrationRecord
from .options import CalibrationOptions
from .pipeline import Action, BlockCallback, CalibrationPipeline, StatisticsSync
from .reconstruction import Reconstruction
from .target_layer import TargetLayer

__all__ = [
    "BlockPlan",
    "CalibrationRun",
    "check_reconstructible",
    "choose_block_stack",
    "prepare_calibration",
    "run_action",
    "with_forward",
]


def with_forward(options: CalibrationOptions, forward_fn: ForwardFn | None) -> CalibrationOptions:
    """``options`` with ``forward_fn`` in place of its own when one is given (checked: a caller's own forward, such as
    a callback's, overrides the configured one).

    Example::

        >>> forward = lambda model, batch: model(batch)
        >>> with_forward(CalibrationOptions(), forward).forward_fn is forward
        True
    """
    return options if forward_fn is None else CalibrationOptions.resolve(options, forward_fn=forward_fn)


class BlockPlan(NamedTuple):
    """The block stack, and whether calibration goes block by block through it (only with a stack).

    Example::

        >>> plan = BlockPlan(stack=None, sequential=False)
        >>> plan.name, plan._replace(sequential=True).sequential
        (None, True)
    """

    stack: BlockStack | None
    sequential: bool

    @property
    def name(self) -> str | None:
        """Name of the stack calibrated block by block, for reports; ``None`` in one-shot mode."""
        return self.stack.name if self.sequential and self.stack is not None else None


def choose_block_stack(
    model: nn.Module, layers: Sequence[TargetLayer], options: CalibrationOptions, *, sequential: bool | None = None
) -> BlockPlan:
    """The block stack (``options.blocks``, or the one found) and whether calibration goes block by block through it.

    Args:
        model: The model.
        layers: Its target layers; none means no stack.
        options: The calibration options.
        sequential: Overrides ``options.sequential`` (a caller that must calibrate in one pass passes ``False``).

    Returns:
        The stack, looked up when calibration is sequential or ``options.blocks`` names one, and whether calibration
        is sequential (only with a stack).

    Raises:
        ValueError: If ``options.blocks`` names no list of blocks.

    Example::

        >>> from torch import nn
        >>> from wanda_lightning.core.targets import find_targets
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
        >>> plan = choose_block_stack(net, find_targets(net)[0], CalibrationOptions())
        >>> len(plan.stack.blocks), plan.sequential
        (2, True)
    """
    sequential = options.sequential if sequential is None else sequential
    wanted = sequential or options.blocks is not None
    stack = find_block_stack(model, layers, options.blocks) if layers and wanted else None
    return BlockPlan(stack, sequential and stack is not None)


@dataclass
class CalibrationRun:
    """A calibration pipeline ready to run, with its prepared batches.

    Attributes:
        pipeline: The pipeline.
        batches: The calibration batches (none when nothing needs data).
        blocks: The block stack and whether calibration goes block by block.

    Made by :func:`prepare_calibration`.
    """

    pipeline: CalibrationPipeline
    batches: list[Any]
    blocks: BlockPlan

    @property
    def num_samples(self) -> int:
        """Calibration sequences over all batches."""
        return sum(batch_size_of(batch) for batch in self.batches)

    def record(self, needs_data: bool) -> dict[str, Any]:
        """The :class:`~wanda_lightning.core.calibration_record.CalibrationRecord` fields known before the run;
        ``needs_data``: whether anything calibrates (a data-free run is not sequential)."""
        return {
            "sequential": self.blocks.sequential and needs_data,
            "block_stack": self.blocks.name,
            "num_samples": self.num_samples,
            "num_batches": len(self.batches),
        }

    def run(self, action: Action) -> float:
        """Runs ``action`` over the batches; returns the seconds spent calibrating."""
        self.pipeline.run(action, self.batches)
        return self.pipeline.calibration_seconds

    def record_reconstruction(self, report: CalibrationRecord) -> None:
        """Fills ``report``'s block reconstruction fields after :meth:`run` (nothing without reconstruction)."""
        pipeline = self.pipeline
        if pipeline.reconstruction is None:
            return
        fits = pipeline.block_fits
        report.reconstruction = pipeline.reconstruction.describe()
        report.reconstruction_seconds = pipeline.reconstruction_seconds
        report.dense_forward_seconds = pipeline.dense_seconds
        report.reconstruction_error = (
            sum(f.error_before for f in fits) / max(1, len(fits)),
            sum(f.error_after for f in fits) / max(1, len(fits)),
        )
        report.reconstruction_undone = sum(not f.kept for f in fits)


def prepare_calibration(
    model: nn.Module,
    layers: Sequence[TargetLayer],
    calibration: Iterable[Any] | None,
    options: CalibrationOptions,
    blocks: BlockPlan,
    *,
    needed_by: str | None,
    sync_statistics: StatisticsSync | None = None,
    progress: bool = False,
    layout: ShardedLayout | None = None,
    source: SafetensorsCheckpoint | None = None,
    on_block_done: BlockCallback | None = None,
    reconstruction: Reconstruction | None = None,
) -> CalibrationRun:
    """Prepares ``calibration`` as ``options`` say and builds the pipeline over ``layers``.

    Args:
        model: The model.
        layers: The layers whose statistics the action takes.
        calibration: The calibration batches as the user gave them.
        options: The calibration options (``num_samples``, ``batch_size``, devices, ``forward_fn``).
        blocks: From :func:`choose_block_stack` (with ``sequential`` ruled out since, where a caller must).
        needed_by: What needs the data, for the message when ``calibration`` is ``None``; ``None`` when nothing does
            (no batch is read).
        sync_statistics: In-place all-reduce of statistic tensors.
        progress: Show a progress bar over blocks.
        layout: Sharded weights: every process then runs the same number of batches.
        source: Checkpoint that meta-device blocks are read from as they come.
        on_block_done: Called as ``on_block_done(block_name, block)`` after each block.
        reconstruction: Train each changed block to its dense outputs (block-sequential calibration only), named in
            messages as ``argument``.

    Raises:
        ValueError: If data is needed and ``calibration`` is ``None`` or yields nothing; if ``reconstruction`` is asked
            without block-sequential calibration or with sharded weights.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from wanda_lightning.core.targets import find_targets
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> layers, _ = find_targets(net)
        >>> run = prepare_calibration(
        ...     net, layers, [torch.randn(3, 4)], CalibrationOptions(), BlockPlan(None, False), needed_by="wanda"
        ... )
        >>> run.num_samples, run.blocks.name
        (3, None)
    """
    if reconstruction is not None:
        check_reconstructible(blocks, layout)
    batches: list[Any] = []
    if needed_by is not None:
        if calibration is None:
            raise ValueError(f"{needed_by} needs `calibration` batches, got None")
        batches = prepare_batches(calibration, options.num_samples, options.batch_size)
        if layout is not None:
            batches = same_count_on_every_rank(batches, layout.all_reduce, layout.world_size)
    # CalibrationOptions turned both devices into torch.device (or None) when it was made.
    device, offload_device = (cast("torch.device | None", d) for d in (options.device, options.offload_device))
    pipeline = CalibrationPipeline(
        model,
        layers,
        stack=blocks.stack,
        sequential=blocks.sequential,
        forward_fn=options.forward_fn,
        progress=progress,
        device=device,
        offload_device=offload_device,
        sync_statistics=sync_statistics,
        layout=layout,
        source=source,
        on_block_done=on_block_done,
        reconstruction=reconstruction,
    )
    return CalibrationRun(pipeline, batches, blocks)


def run_action(run: CalibrationRun, action: Action, report: CalibrationRecord, *, needs_data: bool) -> None:
    """Runs ``action`` over ``run``'s batches and fills ``report``'s calibration fields: what the run knew beforehand
    (:meth:`CalibrationRun.record`), the seconds spent calibrating (added: a call may run more than once) and block
    reconstruction's.

    Args:
        run: From :func:`prepare_calibration`.
        action: What to do with each block's statistics.
        report: The call's report.
        needs_data: Whether anything calibrates (a data-free run is not sequential).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from wanda_lightning.core.targets import find_targets
        >>> from wanda_lightning.core.statistics import InputNormStatistics
        >>> class Norms(Action):
        ...     def statistics(self, layer):
        ...         return {"norms": InputNormStatistics}
        ...     def apply(self, step):
        ...         print(sorted(step.statistics))
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> layers, _ = find_targets(net)
        >>> run = prepare_calibration(
        ...     net, layers, [torch.randn(3, 4)], CalibrationOptions(), BlockPlan(None, False), needed_by="norms"
        ... )
        >>> report = CalibrationRecord()
        >>> run_action(run, Norms(), report, needs_data=True)
        ['0']
        >>> report.num_samples, report.num_batches
        (3, 1)
    """
    for key, value in run.record(needs_data).items():
        setattr(report, key, value)
    report.calibration_seconds += run.run(action)
    run.record_reconstruction(report)


def check_reconstructible(blocks: BlockPlan, layout: ShardedLayout | None) -> None:
    """Raises ``ValueError`` when block reconstruction cannot run: it trains block by block through a block stack,
    on whole weights.

    Example::

        >>> try:
        ...     check_reconstructible(BlockPlan(None, False), None)
        ... except ValueError as error:
        ...     print(str(error)[:46])
        block reconstruction trains block by block: it
    """
    if not blocks.sequential:
        raise ValueError(
            "block reconstruction trains block by block: it needs block-sequential calibration through a block stack "
            "(sequential=True, and `blocks` naming the stack where none is found), got one-shot calibration"
        )
    if layout is not None:
        raise ValueError(
            "block reconstruction trains whole block weights, and this model's are sharded across processes (FSDP); "
            "prune or shrink before sharding, or leave reconstruction out"
        )
