"""``prune()``: validate the arguments, build the calibration pipeline and the mask action, run, report."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core.batches import ForwardFn
from ..core.options import CalibrationFields, CalibrationOptions
from ..core.pipeline import BlockCallback, StatisticsSync, check_finite
from ..core.reconstruction import Reconstruction
from ..core.runner import choose_block_stack, prepare_calibration, run_action, with_forward
from ..core.structure import SparsityStructure
from ..core.target_layer import TargetLayer
from ..core.targets import find_targets, layer_masks, parameter_masks
from ..distributed.readback import kept_from_nonzeros
from ..distributed.sharding import ShardedLayout, fsdp1_layout, sharded_layout
from ..distributed.streaming import SafetensorsCheckpoint, meta_tensor_names
from ..methods.base import PruningMethod, Refinement
from ..methods.owl import OWL
from .action import LayerCallback, MaskAction, check_keeps_pruned, warn_once_per_kind
from .config import PruneConfig
from .report import PruneResult, PruningReport, SkippedLayer

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

__all__ = ["PrunePlan", "plan_prune", "prune", "prune_with"]


def prune(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    structure: str = "unstructured",
    method: str | PruningMethod = "wanda",
    allocation: str | OWL | None = None,
    refine: str | Refinement | Reconstruction | None = None,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    calibration_options: CalibrationOptions | None = None,
    progress: bool = False,
    sync_statistics: StatisticsSync | None = None,
    on_layer_pruned: LayerCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    on_block_pruned: BlockCallback | None = None,
    **options: Unpack[CalibrationFields],
) -> PruningReport:
    """Prunes ``model`` in place with Wanda (or another method) and reports what it did.

    Calibration is block-sequential when a stack of repeated blocks is found (statistics from the unchanged block,
    prune it, run the pruned block to feed the next, as the Wanda reference does), else one pass with hooks on every
    target layer. The model keeps its train/eval modes, dtype and devices, also when an error is raised.

    Args:
        model: Any module: a Hugging Face causal LM, a LightningModule wrapping one, or a plain ``nn.Linear`` model.
        calibration: Iterable of batches or a ``DataLoader``, fed as ``model(**batch)`` (mapping), ``model(batch[0])``
            (tuple or list) or ``model(batch)`` (tensor) unless ``forward_fn`` is given; ``attention_mask`` zeros do
            not count. Data-free methods ignore it.
        sparsity: Fraction of weights zeroed in every output row, in ``[0, 1)``; default 0.5, implied by N:M.
        structure: ``"unstructured"`` or ``"N:M"`` (N of every M consecutive input weights kept).
        method: ``"wanda"``, ``"magnitude"``, ``"sparsegpt"``, ``"admm"``, ``"ria"``, ``"ria-permuted"`` (N:M), another
            registered name, or a :class:`~wanda_lightning.PruningMethod` such as ``Wanda(variant=True)``.
        allocation: ``None``/``"uniform"``, or ``"owl"`` / :class:`~wanda_lightning.OWL`: per-block sparsities from
            the outlier share of Wanda scores (unstructured only).
        refine: ``None``; ``"dsnot"`` (= ``"dsnot-expected"``), ``"dsnot-exact"``, ``"dsnot-unguarded"`` or a
            :class:`~wanda_lightning.DSnoT`; ``"admm-update"`` or an :class:`~wanda_lightning.ADMMUpdate`; or
            ``"reconstruct"`` / a :class:`~wanda_lightning.Reconstruction` (block-sequential only).
        targets: Name patterns (glob, or ``re:`` regex) of the layers to prune; default every ``nn.Linear`` and
            transformers ``Conv1D``.
        ignore: Name patterns to leave alone; default ``["lm_head"]``. Weights tied to an embedding are always left.
        calibration_options: How calibration runs, a :class:`~wanda_lightning.CalibrationOptions`; keywords in
            ``**options`` replace its fields.
        progress: Show a progress bar over blocks.
        sync_statistics: In-place all-reduce of each block's statistic tensors (DDP: every process computes the same
            masks).
        on_layer_pruned: Called as ``on_layer_pruned(name, keep_mask)`` after each layer is pruned.
        checkpoint: For a model built on the meta device, the ``.safetensors`` file or folder its weights are read from,
            block by block (block-sequential calibration, no ``allocation``).
        on_block_pruned: Called as ``on_block_pruned(block_name, block)`` once a block is pruned and has fed the next
            (:class:`~wanda_lightning.BlockSaver` writes it out and releases it).
        **options: Any field of :class:`~wanda_lightning.CalibrationOptions` as a keyword (``num_samples``,
            ``batch_size``, ``sequential``, ``blocks``, ``device``, ``offload_device``, ``forward_fn``).

    Returns:
        A :class:`~wanda_lightning.PruningReport`.

    Raises:
        ValueError, TypeError: For bad arguments, before any weight changes.
        FloatingPointError: For non-finite target weights (before any change) or non-finite statistics. A calibration
            error raised at block *k* leaves the blocks after it untouched and names what was already pruned.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> report = prune(net, [torch.randn(4, 8)], sparsity=0.5)
        >>> report.global_sparsity
        0.5
        >>> (net[0].weight == 0).sum(dim=1).tolist() == [4] * 16
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    resolved = CalibrationOptions.resolve(calibration_options, **options)
    config = PruneConfig.create(
        sparsity=sparsity,
        structure=structure,
        method=method,
        allocation=allocation,
        refine=refine,
        targets=targets,
        ignore=ignore,
        checkpoint=checkpoint,
        options=resolved,
    )
    return prune_with(
        model,
        calibration,
        config,
        progress=progress,
        sync_statistics=sync_statistics,
        on_layer_pruned=on_layer_pruned,
        on_block_pruned=on_block_pruned,
    ).report


def prune_with(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    config: PruneConfig,
    *,
    progress: bool = False,
    sync_statistics: StatisticsSync | None = None,
    on_layer_pruned: LayerCallback | None = None,
    on_block_pruned: BlockCallback | None = None,
    already_pruned: Mapping[str, Tensor] | None = None,
    forward_fn: ForwardFn | None = None,
    keep_masks: bool = False,
    plan: PrunePlan | None = None,
) -> PruneResult:
    """:func:`prune` with a :class:`~wanda_lightning.pruning.config.PruneConfig` made beforehand (the callback builds
    one when it is constructed, and prunes with it later); returns what it made.

    The target layers are found once, here; the result carries them, the report and (with ``keep_masks``) the keep
    masks by parameter name, so a caller needs nothing else to keep, save or export the masks.

    Args:
        model: As for :func:`prune`.
        calibration: As for :func:`prune`.
        config: The configuration.
        progress: Show a progress bar over blocks.
        sync_statistics: As for :func:`prune`.
        on_layer_pruned: As for :func:`prune`.
        on_block_pruned: As for :func:`prune`.
        already_pruned: Drop masks by parameter name (True where a weight was pruned before), shaped like the
            parameters: a gradual schedule re-prunes a partly pruned (and further trained) model at a higher sparsity,
            and those weights stay pruned whatever their new scores (see
            :func:`~wanda_lightning.pruning.action.check_keeps_pruned` for what the configuration must allow).
        forward_fn: Replaces ``config.options.forward_fn`` (a callback runs its LightningModule its own way).
        keep_masks: Put the keep masks in the result.
        plan: From :func:`plan_prune` on this model and configuration (made here when not given).

    Returns:
        A :class:`~wanda_lightning.pruning.report.PruneResult`.

    Checks what depends on the model (target layers, sharding, N:M shapes, finite weights, a meta-device model's
    checkpoint) before any weight changes, then runs the :class:`~wanda_lightning.core.pipeline.CalibrationPipeline`
    with a :class:`~wanda_lightning.pruning.action.MaskAction`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> config = PruneConfig.create(structure="2:4")
        >>> result = prune_with(nn.Sequential(nn.Linear(8, 4)), [torch.randn(2, 8)], config)
        >>> result.report.structure, result.report.global_sparsity
        ('2:4', 0.5)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    options = with_forward(config.options, forward_fn)
    if on_block_pruned is not None and not callable(on_block_pruned):
        raise TypeError(
            f"`on_block_pruned` must be callable as on_block_pruned(block_name, block), got {on_block_pruned!r}"
        )
    if already_pruned:
        check_keeps_pruned(config)
    total_start = time.perf_counter()
    if plan is None:
        plan = plan_prune(model, config)
    if plan.method is not config.method:  # a row-local variant of the method, for weights split by rows
        config = replace(config, method=plan.method)
    layers, layout, source = plan.layers, plan.layout, plan.source
    blocks = choose_block_stack(model, layers, options)
    if blocks.sequential and layout is not None and layout.fsdp1_owners:
        warnings.warn(
            "FSDP1 (FullyShardedDataParallel) models are calibrated in one pass over the whole model: block-sequential "
            "calibration would stop FSDP1 forwards midway. Pass sequential=False to silence this, or use FSDP2 "
            "(fully_shard), which supports block-sequential calibration",
            stacklevel=3,
        )
        blocks = blocks._replace(sequential=False)
    needs_data = config.needs_data
    if source is not None:
        if config.allocation is not None:
            raise ValueError(
                "`allocation`='owl' scores every block on the dense model before pruning the first, which a model "
                "read block by block from `checkpoint` cannot do; load the model, or use allocation=None"
            )
        if not (blocks.sequential and needs_data):
            source.materialize(model, "", options.device)  # no block-by-block pass to stream into: read everything
            check_finite(layers, " (read from the checkpoint)")
            source = None
        else:
            assert blocks.stack is not None
            prefix = blocks.stack.name
            source.materialize(model, "", options.device, exclude=f"{prefix}." if prefix else None)
    run = prepare_calibration(
        model,
        layers,
        calibration,
        options,
        blocks,
        needed_by=" + ".join(config.requirements()) if needs_data else None,
        sync_statistics=sync_statistics,
        progress=progress,
        layout=layout,
        source=source,
        on_block_done=on_block_pruned,
        reconstruction=config.reconstruction,
    )
    report = PruningReport(
        method=config.method.describe(),
        allocation=config.allocation.describe() if config.allocation is not None else None,
        refinement=config.refinement.describe() if config.refinement is not None else None,
        structure=config.structure.name,
        target_sparsity=config.structure.sparsity,
        skipped=[SkippedLayer(name, reason) for name, reason in plan.skipped],
    )
    # FSDP1 hands out full masks while each process holds a flattened piece of each weight: its masks are read back
    # from the pruned shards afterwards instead.
    collect = keep_masks and (layout is None or not layout.fsdp1_owners)
    keeps: dict[str, Tensor] = {}

    def layer_pruned(name: str, keep: Tensor) -> None:
        if collect:
            keeps[name] = keep
        if on_layer_pruned is not None:
            on_layer_pruned(name, keep)

    already = layer_masks(layers, already_pruned) if already_pruned else None
    action = MaskAction(config, model, layers, report, layer_pruned, already_pruned=already)
    run_action(run, action, report, needs_data=needs_data)
    warn_once_per_kind(report.warnings)
    if layout is not None and layout.sharded_layers:
        _gather_layer_counts(report, layout)
    masks: dict[str, Tensor] = {}
    if collect:
        # Shaped like the parameters (Conv1D stores (in, out)); under FSDP2, like this rank's shard of them.
        masks = parameter_masks(layers, keeps)
    elif keep_masks:
        masks = kept_from_nonzeros(layers)
    report.total_seconds = time.perf_counter() - total_start
    return PruneResult(report, list(layers), masks)


@dataclass
class PrunePlan:
    """What :func:`prune_with` will prune, found and checked before any weight changes.

    Attributes:
        layers: The target layers.
        skipped: Layers left alone, with the reason, as ``(name, reason)``.
        layout: How the weights are sharded across processes, or ``None``.
        method: The method to run: the configured one, or its row-local variant for weights split by rows.
        source: The checkpoint a meta-device model's weights are read from, or ``None``.
    """

    layers: list[TargetLayer]
    skipped: list[tuple[str, str]]
    layout: ShardedLayout | None
    method: PruningMethod
    source: SafetensorsCheckpoint | None

    def parameters(self) -> dict[str, Tensor]:
        """The weights the plan prunes, by parameter name (one entry per parameter)."""
        return {layer.parameter_name: layer.tensor for layer in self.layers}


def plan_prune(model: nn.Module, config: PruneConfig) -> PrunePlan:
    """Finds the target layers of ``model`` and checks what depends on the model (a meta-device model's checkpoint,
    sharding, N:M shapes, finite weights), before any weight changes.

    Raises:
        ValueError: For a model the configuration cannot prune (see the message).
        FloatingPointError: For non-finite target weights.

    Example::

        >>> from torch import nn
        >>> plan = plan_prune(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), PruneConfig.create())
        >>> [layer.name for layer in plan.layers]
        ['0', '2']
    """
    meta = meta_tensor_names(model)
    source = _open_checkpoint(model, config, meta)
    layers, skipped = find_targets(model, config.targets, config.ignore)
    layout = sharded_layout(layers) or fsdp1_layout(model, layers)
    method = _check_shardable(layout, config).method if layout is not None else config.method
    # Meta weights are checked once read; FSDP1 ones (not readable outside summon_full_params, whose storage may be
    # freed) when their unit's full parameters are summoned: the scores are checked before anything is written.
    unreadable = set(layout.fsdp1_owners) if layout is not None else set()
    check_finite([t for t in layers if t.name not in unreadable and not t.weight_2d.is_meta], "", layout)
    _check_n_m_shapes(layers, config.structure)
    return PrunePlan(list(layers), list(skipped), layout, method, source)


def _open_checkpoint(model: nn.Module, config: PruneConfig, meta: list[str]) -> SafetensorsCheckpoint | None:
    """The checkpoint a meta-device model's weights are read from, checked against the model; ``None`` otherwise."""
    if meta and config.checkpoint is None:
        raise ValueError(
            f"parameters on the meta device cannot be pruned: {meta[:5]}{' ...' if len(meta) > 5 else ''}; load or "
            "materialise the weights first, or pass `checkpoint` (their safetensors file or folder)"
        )
    if config.checkpoint is None:
        return None
    source = SafetensorsCheckpoint(config.checkpoint)
    tie_weights = getattr(model, "tie_weights", None)
    if meta and callable(tie_weights):
        # As from_pretrained does: a tied head is stored once (under the embeddings) in the checkpoint.
        tie_weights()
    missing = source.missing(model)
    if missing:
        raise ValueError(
            f"`checkpoint`={str(config.checkpoint)!r} has no tensor {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            "for the model's meta parameters or buffers (names as in model.state_dict()); build the model with "
            "accelerate's init_empty_weights(), which keeps buffers such as rotary tables real"
        )
    return source if meta else None


def _check_n_m_shapes(layers: Sequence[TargetLayer], structure: SparsityStructure) -> None:
    if not structure.is_n_m:
        return
    assert structure.m is not None
    bad = [f"{t.name} (in_features={t.in_features})" for t in layers if t.in_features % structure.m]
    if bad:
        raise ValueError(
            f"`structure`={structure.name!r} needs in_features to be a multiple of {structure.m}; not so for {bad}; "
            "leave these layers out with `ignore`"
        )


def _check_shardable(layout: ShardedLayout, config: PruneConfig) -> PruneConfig:
    """Refuses what cannot run on row shards; returns ``config`` with the method to use on them (a row-local variant
    of the configured one, with a warning, when it has one)."""
    method, structure = config.method, config.structure
    if layout.sharded_layers and not method.shard_local(structure):
        variant = method.for_row_shards(structure)
        if variant is None:
            raise ValueError(
                f"`method`={method.describe()!r} with `structure`={structure.name!r} compares weights across output "
                f"rows, and layer(s) {layout.sharded_layers[:3]} are split by rows across {layout.world_size} "
                "processes (FSDP2); use 'wanda', 'magnitude', 'admm' or an N:M structure with 'sparsegpt', or prune "
                "before sharding"
            )
        warnings.warn(
            f"`method`={method.describe()!r} ranks weights across output rows, and layer(s) "
            f"{layout.sharded_layers[:3]} are split by rows across {layout.world_size} processes (FSDP2): each row is "
            f"ranked on its own instead ({variant.describe()!r})",
            stacklevel=5,
        )
        config = replace(config, method=variant)
    refinement = config.refinement
    if layout.sharded_layers and refinement is not None and not refinement.shard_local(structure):
        raise ValueError(
            f"`refine`={refinement.describe()!r} compares weights across output rows, and layer(s) "
            f"{layout.sharded_layers[:3]} are split by rows across {layout.world_size} processes (FSDP2); prune "
            "before sharding, or leave `refine` out"
        )
    device = config.options.device
    if device is not None:
        raise ValueError(
            f"`device`={str(device)!r} moves blocks between devices, which FSDP2 manages for sharded weights; "
            "leave `device` at None"
        )
    if method.permute_channels:
        raise ValueError(
            f"`method`={method.describe()!r} reorders the hidden units of whole MLPs, whose weights are split "
            f"across {layout.world_size} processes here; prune before sharding, or use method='ria'"
        )
    return config


def _gather_layer_counts(report: PruningReport, layout: ShardedLayout) -> None:
    """Sums each layer's pruned count over the ranks' row shards, so the report describes whole weights."""
    sharded = set(layout.sharded_layers)
    entries = [entry for entry in report.layers if entry.name in sharded]
    counts = torch.tensor([float(entry.num_pruned) for entry in entries], dtype=torch.float64)
    layout.all_reduce([counts], "sum")
    for entry, count in zip(entries, counts.tolist(), strict=True):
        entry.num_pruned = int(count)
        entry.sparsity = entry.num_pruned / (entry.shape[0] * entry.shape[1])
