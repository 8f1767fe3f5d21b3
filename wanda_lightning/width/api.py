"""``shrink()``: validate, plan uniform widths the model's config can express, run the calibration pipeline with the
:class:`~wanda_lightning.width.action.ShrinkAction`, rewrite the config, report."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from ..core.batches import ForwardFn, prepare_batches
from ..core.blocks import BlockStack
from ..core.layers import find_pretrained, is_conv1d
from ..core.options import CalibrationFields, CalibrationOptions
from ..core.pipeline import BlockCallback, StatisticsSync, check_finite
from ..core.reconstruction import Reconstruction
from ..core.runner import BlockPlan, choose_block_stack, prepare_calibration, run_action, with_forward
from ..core.target_layer import TargetLayer
from ..depth.api import DepthPlan, plan_depth, prune_depth
from ..depth.scores import LayerScore
from ..distributed.sharding import holds_shards
from ..distributed.streaming import meta_tensor_names
from .action import AdaptiveShrinkAction, ShrinkAction
from .config import ShrinkConfig, kept_units, resolve_multiple, units_to_remove
from .groups import UnitGroup, find_unit_groups
from .hf_config import check_expressible
from .methods import WidthMethod
from .report import ShrinkReport, linear_macs_per_token, parameter_count
from .speed_target import SpeedOn, SpeedTarget
from .speedup import search_speedup, speed_target_record

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

__all__ = ["ShrinkPlan", "plan_shrink", "shrink", "shrink_with"]


def shrink(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    mlp: float = 0.0,
    heads: float = 0.0,
    method: str | WidthMethod = "wanda-sp",
    update: str | Reconstruction | None = None,
    widths: str = "uniform",
    layers: float = 0.0,
    layer_score: LayerScore = "influence",
    speedup: float | SpeedTarget | None = None,
    speed_on: SpeedOn = "decode",
    multiple_of: int | None = None,
    calibration_options: CalibrationOptions | None = None,
    progress: bool = False,
    sync_statistics: StatisticsSync | None = None,
    **options: Unpack[CalibrationFields],
) -> ShrinkReport:
    """Removes whole decoder blocks, MLP hidden units and attention heads from ``model``, in place, ranked from
    calibration data, and rewrites the config so that ``save_pretrained`` writes a folder stock ``from_pretrained``
    loads.

    Blocks go first (scored in one dense pass by how little they change their input), then each block's units are
    scored from the layer that consumes them and removed from its columns and from the producers' rows, block by block
    as in :func:`~wanda_lightning.prune`. Widths are uniform; under grouped-query attention heads go in key/value
    groups. The shrunk model computes what the original computes with those blocks and units removed.

    Args:
        model: A transformers causal LM (heads and MLP: Llama, Mistral, Qwen2, ...; MLP only: GPT-2, OPT, GPT-NeoX), a
            module holding one, or any module whose MLPs follow those layer names.
        calibration: Batches, as for :func:`~wanda_lightning.prune` (not needed by ``"magnitude-sp"``).
        mlp: Fraction of each MLP's hidden units to remove, in ``[0, 1)``.
        heads: Fraction of attention heads (key/value groups under GQA) to remove, in ``[0, 1)``. A fraction that
            rounds to no unit, or to all, is refused.
        method: ``"wanda-sp"`` (default), ``"flap"``, ``"magnitude-sp"``, or a :class:`~wanda_lightning.WidthMethod`.
        update: ``"none"``, ``"bias"``, ``"least-squares"``, ``"reconstruct"`` or a
            :class:`~wanda_lightning.Reconstruction`; ``None``: the method's default (``"bias"`` for ``"flap"``).
        widths: ``"uniform"`` (default) or ``"adaptive"`` (FLAP's global ranking; modules without a transformers
            config only).
        layers: Fraction of the decoder blocks to remove, in ``[0, 1)``, rounded to whole blocks.
        layer_score: ``"influence"`` (default; ShortGPT's block influence) or ``"angular"`` (the closest run of
            consecutive blocks, Gromov et al.).
        speedup: Instead of ``layers``, ``mlp`` and ``heads``: the speed-up over the dense model to reach where the
            model runs, or a :class:`~wanda_lightning.SpeedTarget`; the report lists every candidate timed
            (:meth:`~wanda_lightning.ShrinkReport.candidates_table`). Not with ``sync_statistics``.
        speed_on: What ``speedup`` measures: ``"decode"`` (default) or ``"prefill"``.
        multiple_of: Each kept width is rounded to a multiple of this (32 fits GGUF ``q8_0``/``q4_0`` blocks);
            ``None``: 32 for each kind whose dense width is a multiple of 32, else 1.
        calibration_options: How calibration runs, a :class:`~wanda_lightning.CalibrationOptions`; keywords in
            ``**options`` replace its fields.
        progress: Show a progress bar over blocks.
        sync_statistics: In-place all-reduce of statistic tensors (DDP: every process removes the same units).
        **options: Any field of :class:`~wanda_lightning.CalibrationOptions` as a keyword.

    Returns:
        A :class:`~wanda_lightning.ShrinkReport` with every layer's widths before and after.

    Raises:
        ValueError, TypeError: For bad arguments, a layout or config that cannot lose the units or blocks asked for
            (the message names the layer and why), or sharded weights, before any weight changes.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> mlp = nn.Module()
        >>> mlp.up_proj, mlp.down_proj = nn.Linear(4, 8), nn.Linear(8, 4)
        >>> mlp.gate_proj = nn.Linear(4, 8)
        >>> mlp.forward = lambda x: mlp.down_proj(mlp.gate_proj(x) * mlp.up_proj(x))
        >>> report = shrink(mlp, [torch.randn(2, 4)], mlp=0.5)
        >>> mlp.down_proj.in_features, report.units("mlp")
        (4, (8, 4))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    resolved = CalibrationOptions.resolve(calibration_options, **options)
    config = ShrinkConfig.create(
        mlp=mlp,
        heads=heads,
        method=method,
        update=update,
        widths=widths,
        options=resolved,
        layers=layers,
        layer_score=layer_score,
        speedup=speedup,
        speed_on=speed_on,
        multiple_of=multiple_of,
    )
    return shrink_with(model, calibration, config, progress=progress, sync_statistics=sync_statistics)


class ShrinkPlan:
    """Everything :func:`shrink_with` decided before touching a weight.

    Attributes:
        groups: The unit groups that lose units.
        keep: Units kept per group, by consumer name (uniform widths).
        remove: Units removed per kind over all layers (adaptive widths), else empty.
        config_updates: Config attributes to rewrite afterwards (empty without a transformers config).
        bias_layers: Layers that gain a zero bias (a bias flag the update sets gives them one).
        config_owner: The module whose ``config`` is rewritten, or ``None``.
        biased: Unit kinds whose consumers may carry a (new) bias.
        multiples: Per unit kind, the multiple its kept width was rounded to (uniform widths; 1: as asked).
        depth: The blocks depth pruning removes first, or ``None``.
        blocks: The block stack the widths are calibrated through, and whether block by block (``None`` without
            widths to change).
    """

    def __init__(
        self,
        groups: list[UnitGroup],
        keep: dict[str, int],
        remove: dict[str, int],
        config_updates: dict[str, Any],
        bias_layers: list[str],
        config_owner: nn.Module | None,
        biased: set[str],
        multiples: dict[str, int] | None = None,
        *,
        depth: DepthPlan | None = None,
        blocks: BlockPlan | None = None,
    ) -> None:
        self.groups = groups
        self.keep = keep
        self.remove = remove
        self.config_updates = config_updates
        self.bias_layers = bias_layers
        self.config_owner = config_owner
        self.biased = biased
        self.multiples = multiples if multiples is not None else {}
        self.depth = depth
        self.blocks = blocks

    @property
    def block_steps(self) -> int:
        """Blocks whose widths change (after depth pruning): the steps of a progress bar."""
        if not self.groups:
            return 0
        first = self.groups[0].kind
        removed = self.depth.count if self.depth is not None else 0
        return max(0, sum(g.kind == first for g in self.groups) - removed)

    def after_blocks_removed(self, removed: Sequence[int]) -> None:
        """Follows depth pruning: the groups of the removed blocks go, the others take their blocks' new names and
        indices, and the widths are calibrated through the shorter stack.

        Args:
            removed: Indices of the removed blocks in :attr:`depth`'s stack.
        """
        assert self.depth is not None and self.blocks is not None
        old = self.depth.stack
        gone = set(removed)
        kept = [index for index in range(len(old.blocks)) if index not in gone]
        keys = (
            [old.keys[i] for i in kept]
            if not all(k.isdigit() for k in old.keys)
            else [str(i) for i in range(len(kept))]
        )
        new = BlockStack(old.name, [old.blocks[i] for i in kept], keys)
        new_index = {index: position for position, index in enumerate(kept)}
        renames = {old.block_name(index): new.block_name(position) for index, position in new_index.items()}

        def renamed(name: str) -> str:
            block = old.index_of(name)
            if block is None:
                return name
            prefix = old.block_name(block)
            return renames[prefix] + name[len(prefix) :]

        if self.blocks.stack is not None and self.blocks.stack.name != old.name:
            raise ValueError(
                f"depth pruning removes blocks of `{old.name}`, and the widths are calibrated through another stack "
                f"(`{self.blocks.stack.name}`): name the stack with `blocks`"
            )
        groups = []
        for group in self.groups:
            index = old.index_of(group.consumer.name)
            if index in gone:
                continue
            for member in group.members:
                member.name = renamed(member.name)
            group.block = new_index[index] if index is not None else group.block
            groups.append(group)
        self.groups = groups
        self.keep = {renamed(name): units for name, units in self.keep.items() if old.index_of(name) not in gone}
        self.bias_layers = [renamed(name) for name in self.bias_layers if old.index_of(name) not in gone]
        if self.blocks.stack is not None:
            self.blocks = self.blocks._replace(stack=new)


def plan_shrink(model: nn.Module, config: ShrinkConfig, options: CalibrationOptions | None = None) -> ShrinkPlan:
    """The whole plan of a shrink, made once and checked before any weight changes: the blocks depth pruning removes,
    the unit groups (found once), the units each keeps, the block stack widths are calibrated through and the config
    that will describe the result.

    Args:
        model: The model, as it is now.
        config: The configuration.
        options: The calibration options to plan with (default ``config.options``).

    Raises:
        ValueError: See :func:`shrink`.

    Example::

        >>> from torch import nn
        >>> layers = {"gate_proj": nn.Linear(4, 8), "up_proj": nn.Linear(4, 8), "down_proj": nn.Linear(8, 4)}
        >>> block = nn.ModuleDict(layers)
        >>> plan = plan_shrink(block, ShrinkConfig.create(mlp=0.5, multiple_of=1))
        >>> plan.keep, plan.depth is None
        ({'down_proj': 4}, True)
    """
    options = config.options if options is None else options
    _check_whole_weights(model)
    depth = plan_depth(model, config.layers, options) if config.layers else None
    if not config.kinds:
        return ShrinkPlan([], {}, {}, {}, [], None, set(), depth=depth)
    groups = find_unit_groups(model, None, list(config.kinds))
    # Adaptive widths rank every layer's units at once.
    sequential = options.sequential and config.widths != "adaptive"
    blocks = choose_block_stack(
        model, [g.target() for g in groups if g.problem is None], options, sequential=sequential
    )
    if blocks.stack is not None:
        for group in groups:
            group.block = blocks.stack.index_of(group.consumer.name)
    plan = _plan_units(model, config, groups)
    check_finite(_member_layers(plan.groups), "")
    plan.depth, plan.blocks = depth, blocks
    return plan


def _plan_units(model: nn.Module, config: ShrinkConfig, groups: list[UnitGroup]) -> ShrinkPlan:
    """The units each of ``groups`` keeps and the config that will describe them, checked."""
    found_pretrained = find_pretrained(model)
    adaptive = config.widths == "adaptive"
    if adaptive and found_pretrained is not None:
        config_class = type(found_pretrained[0].config).__name__
        raise ValueError(
            f"`widths`='adaptive' gives every layer its own width, which {config_class} cannot hold (one width per "
            "model): the result would not load with from_pretrained; use widths='uniform'"
        )
    uniform: dict[str, int] = {}
    remove: dict[str, int] = {}
    multiples: dict[str, int] = {}
    for kind in config.kinds:
        argument = "mlp" if kind == "mlp" else "heads"
        found = [g for g in groups if g.kind == kind]
        if not found:
            what = "MLP (down_proj, fc2, dense_4h_to_h, mlp.c_proj, w2)" if kind == "mlp" else "attention (o_proj)"
            raise ValueError(
                f"`{argument}`={config.fraction(kind):g}: {type(model).__name__} has no {what} layout this library can "
                f"shrink; set `{argument}`=0"
            )
        for group in found:
            if group.problem is not None:
                raise ValueError(
                    f"layer {group.consumer.name!r} cannot lose heads: {group.problem}, whose heads this library "
                    "cannot separate; set `heads`=0 to shrink the MLPs only"
                )
        if adaptive:
            total = sum(g.num_units for g in found)
            remove[kind] = units_to_remove(config.fraction(kind), total, argument, f"all {len(found)} {kind} layers")
            if remove[kind] > total - len(found):
                raise ValueError(
                    f"`{argument}`={config.fraction(kind):g} removes {remove[kind]} of {total} units, which would "
                    "leave some layer with none; use less"
                )
            continue
        counts = {g.num_units for g in found}
        if len(counts) > 1:
            raise ValueError(
                f"`{argument}`: the {kind} layers have different widths ({sorted(counts)}), so uniform widths cannot "
                "be kept; use widths='adaptive'"
            )
        units, consumer = counts.pop(), found[0].consumer
        multiples[kind] = resolve_multiple(config.multiple_of, units * consumer.per_unit)
        uniform[kind] = kept_units(
            config.fraction(kind), units, consumer.per_unit, multiples[kind], argument, consumer.name
        )
    groups = [g for g in groups if g.kind in config.kinds]
    updates: dict[str, Any] = {}
    bias_layers: list[str] = []
    owner: nn.Module | None = None
    biased = set(config.kinds) if config.method.update != "none" else set()
    if found_pretrained is not None:
        owner, prefix = found_pretrained
        prefix = f"{prefix}." if prefix else ""
        updates, bias_layers = check_expressible(owner, groups, uniform, [], prefix)  # the widths alone
        if biased:
            try:
                updates, bias_layers = check_expressible(owner, groups, uniform, sorted(biased), prefix)
            except ValueError:
                if config.method.update == "bias":
                    raise
                biased = set()  # least-squares refits the weights alone where the config holds no bias
    keep = {g.consumer.name: uniform[g.kind] for g in groups if g.kind in uniform}
    return ShrinkPlan(groups, keep, remove, updates, bias_layers, owner, biased, multiples)


def shrink_with(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    config: ShrinkConfig,
    *,
    forward_fn: ForwardFn | None = None,
    progress: bool = False,
    sync_statistics: StatisticsSync | None = None,
    on_block_done: BlockCallback | None = None,
    plan: ShrinkPlan | None = None,
) -> ShrinkReport:
    """:func:`shrink` with a :class:`~wanda_lightning.width.config.ShrinkConfig` made beforehand (the callback builds
    one when it is constructed); ``forward_fn``, when given, replaces ``config.options.forward_fn``;
    ``on_block_done(block_name, block)`` is called after each block of block-sequential calibration; ``plan``: from
    :func:`plan_shrink` on this model and configuration (made here when not given; unused with a speed target, whose
    shape is searched first).

    Example::

        >>> from torch import nn
        >>> class MLP(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        ...     def forward(self, x):
        ...         return self.down_proj(self.gate_proj(x) * self.up_proj(x))
        >>> model = MLP()
        >>> report = shrink_with(model, None, ShrinkConfig.create(mlp=0.25, method="magnitude-sp"))
        >>> model.up_proj.out_features, report.num_samples
        (6, 0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    options = with_forward(config.options, forward_fn)
    total_start = time.perf_counter()
    _check_whole_weights(model)
    if config.speed_target is not None:
        speed_config = replace(config, options=options)
        return _shrink_to_speed(model, calibration, speed_config, sync_statistics, on_block_done, progress)
    report = ShrinkReport(
        method=config.describe_method(),
        mlp=config.mlp,
        heads=config.heads,
        layers=config.layers,
        parameters_before=parameter_count(model),
        macs_before=linear_macs_per_token(model),
    )
    # Everything is checked before the first change: the depth plan, then the widths on the model as it is.
    if plan is None:
        plan = plan_shrink(model, config, options)
    depth = plan.depth
    if depth is not None:
        run = prepare_calibration(
            model,
            depth.layers,
            calibration,
            options,
            depth.blocks,
            needed_by=f"`layers`={config.layers:g}",
            sync_statistics=sync_statistics,
            progress=progress,
        )
        result = prune_depth(run.pipeline, run.batches, depth, config.layer_score)
        report.layer_score = config.layer_score
        report.blocks_before = len(depth.stack.blocks)
        report.removed_blocks = result.removed
        report.removed_from = depth.stack.name
        report.block_scores = result.scores
        report.config_updates.update(result.config_updates)
        report.calibration_seconds += run.pipeline.calibration_seconds
        _fill_record(report, run.record(True))
        # The widths are calibrated on the shorter model, on the same batches.
        calibration, options = run.batches, options.with_batches_as_given()
        if plan.blocks is not None:
            plan.after_blocks_removed(result.removed)
    if plan.blocks is not None:
        report.multiple_of = plan.multiples
        needs = config.method.describe() if config.method.needs_data else None
        run = prepare_calibration(
            model,
            [g.target() for g in plan.groups],
            calibration,
            options,
            plan.blocks,
            needed_by=needs,
            sync_statistics=sync_statistics,
            progress=progress,
            on_block_done=on_block_done,
            reconstruction=config.reconstruction,
        )
        groups = {g.consumer.name: g for g in plan.groups}
        action: ShrinkAction = (
            AdaptiveShrinkAction(config.method, groups, plan.remove, report, set(plan.bias_layers), plan.biased)
            if config.widths == "adaptive"
            else ShrinkAction(config.method, groups, plan.keep, report, set(plan.bias_layers), plan.biased)
        )
        run_action(run, action, report, needs_data=needs is not None)
        if plan.config_owner is not None:
            for key, value in plan.config_updates.items():
                setattr(plan.config_owner.config, key, value)
        report.config_updates.update(plan.config_updates)
    report.parameters_after = parameter_count(model)
    report.macs_after = linear_macs_per_token(model)
    report.total_seconds = time.perf_counter() - total_start
    return report


def _shrink_to_speed(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    config: ShrinkConfig,
    sync_statistics: StatisticsSync | None,
    on_block_done: BlockCallback | None,
    progress: bool,
) -> ShrinkReport:
    """:func:`shrink_with` for a speed target: search the shape (:func:`~wanda_lightning.width.speedup.search_speedup`),
    then shrink with it."""
    start = time.perf_counter()
    target = config.speed_target
    assert target is not None
    if sync_statistics is not None:
        raise ValueError(
            "`speedup` times candidates on each process, and timings differ between processes, which would choose "
            "different shapes: search on one process, then pass the chosen `layers`, `mlp` and `heads`"
        )
    if calibration is None:
        raise ValueError("`speedup` needs `calibration` batches to estimate each candidate's quality, got None")
    options = config.options
    batches = prepare_batches(calibration, options.num_samples, options.batch_size)
    base = replace(config, speed_target=None, options=options.with_batches_as_given())
    if any(target.layers):
        try:  # whether blocks can go at all (the fractions themselves are checked per candidate)
            plan_depth(model, 0.5, base.options)
        except ValueError:
            target = replace(target, layers=(0.0,))  # widths only
    found = find_pretrained(model)
    num_blocks = int(getattr(found[0].config, "num_hidden_layers", 0) or 0) if found is not None else 0

    def shrinker(trial: nn.Module, trial_config: ShrinkConfig) -> None:
        shrink_with(trial, batches, trial_config)

    candidates = search_speedup(
        model,
        batches,
        base,
        target,
        shrinker,
        device=cast("torch.device | None", options.device),
        plan_widths=lambda widths: plan_shrink(model, widths).config_updates,
        num_blocks=num_blocks,
    )
    chosen = next(c for c in candidates if c.chosen)
    final = replace(base, layers=chosen.layers, mlp=chosen.mlp, heads=chosen.heads)
    report = shrink_with(model, batches, final, on_block_done=on_block_done, progress=progress)
    device = options.device if options.device is not None else next(model.parameters()).device
    report.method = f"speed target {target.speedup:g}x ({target.on}) -> {report.method}"
    report.speed_target = speed_target_record(target, candidates, device)
    report.candidates = [c.to_dict() for c in candidates]
    report.total_seconds = time.perf_counter() - start
    return report


def _fill_record(report: ShrinkReport, record: dict[str, Any]) -> None:
    """Sets the calibration fields a run knows beforehand (the later run's, when depth and widths both run)."""
    for key, value in record.items():
        setattr(report, key, value)


def _check_whole_weights(model: nn.Module) -> None:
    if meta_tensor_names(model):
        raise ValueError("parameters on the meta device cannot be shrunk: load or materialise the weights first")
    if holds_shards(model):
        raise ValueError(
            "shrink() needs whole weights, and this model's are sharded across processes (FSDP): removing units "
            "changes every shard's shape; shrink before sharding, or gather the model first"
        )


def _member_layers(groups: list[UnitGroup]) -> list[TargetLayer]:
    return [
        TargetLayer(member.name, member.module, transposed=is_conv1d(member.module))
        for group in groups
        for member in group.members
    ]
