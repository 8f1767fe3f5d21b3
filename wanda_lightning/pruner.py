"""The engine: ``prune()`` calibrates, scores, masks and reports, block by block or in one shot."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .allocation import OWL, get_allocation, owl_outlier_ratio, owl_sparsities
from .blocks import BlockStack, find_block_stack
from .calibration import (
    ForwardFn,
    batch_size_of,
    default_forward,
    input_device,
    move_to,
    prepare_batches,
    token_mask_of,
)
from .channels import find_channel_couplings
from .methods import PruningMethod, Wanda, get_method
from .refinement import DSnoT, get_refinement
from .report import LayerReport, PruningReport, SkippedLayer
from .sharding import ShardedLayout, fsdp1_layout, reshard_fsdp_modules, sharded_layout, with_full_weights
from .statistics import InputNormStatistics, LayerStatistics, flatten_tokens
from .streaming import SafetensorsCheckpoint, meta_tensor_names
from .structure import SparsityStructure, parse_structure
from .targets import TargetLayer, find_targets

__all__ = ["prune"]

StatisticsSync = Callable[[list[Tensor]], None]
LayerCallback = Callable[[str, Tensor], None]
BlockCallback = Callable[[str, nn.Module], None]
StatisticsFactory = Callable[[int, torch.device], LayerStatistics | None]

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _StopForward(Exception):
    """Raised by a hook once every layer of interest has seen its input, to skip the rest of the forward."""


class _BlockInputsCaptured(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args = args
        self.kwargs = kwargs


@dataclass
class _BlockInput:
    """Everything one calibration batch feeds the current block; ``hidden`` is replaced block after block."""

    hidden: Tensor
    hidden_positional: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: Tensor | None
    num_sequences: int


class _StatisticsCollector:
    """Forward pre-hooks that feed each target layer's input to its statistics.

    Every layer gets one statistics object per factory (the method's, then the refinement's). Layers that receive the
    very same input tensor one after the other share the summary of it (one ``x^T x`` for ``q``/``k``/``v``); the cache
    holds a reference to that one tensor, so its memory cannot be reused by another tensor while it is cached.
    """

    def __init__(
        self,
        layers: Sequence[TargetLayer],
        factories: dict[str, StatisticsFactory],
        stop_when_done: bool,
    ) -> None:
        self.layers = list(layers)
        self.statistics: dict[str, dict[str, LayerStatistics]] = {}
        for layer in self.layers:
            made = {key: factory(layer.in_features, layer.weight_2d.device) for key, factory in factories.items()}
            self.statistics[layer.name] = {key: stats for key, stats in made.items() if stats is not None}
        self.stop_when_done = stop_when_done
        self.token_mask: Tensor | None = None
        self.num_sequences = 0
        self._seen: set[str] = set()
        self._cache: list[tuple[Tensor, int, type, tuple[Tensor, ...]]] = []

    def start_batch(self, token_mask: Tensor | None, num_sequences: int) -> None:
        self.token_mask = token_mask
        self.num_sequences = num_sequences
        self._seen.clear()
        self._cache.clear()

    def _summary(self, stats: LayerStatistics, inputs: Tensor, version: int) -> tuple[Tensor, ...]:
        for tensor, seen_version, kind, summary in self._cache:
            if tensor is inputs and seen_version == version and kind is type(stats):
                return summary
        # Layers sharing an input run back to back (q/k/v, gate/up): keep only the current input's summaries, so the
        # cache never holds a whole forward's activations alive.
        self._cache = [entry for entry in self._cache if entry[0] is inputs and entry[1] == version]
        tokens, mask = flatten_tokens(inputs, self.token_mask, stats.in_features)
        summary = stats.summarize(tokens, mask)
        self._cache.append((inputs, version, type(stats), summary))
        return summary

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = (args[0] if args else next(iter(kwargs.values()))).detach()
            version = inputs._version
            for stats in self.statistics[name].values():
                stats.accumulate(self._summary(stats, inputs, version), self.num_sequences)
            self._seen.add(name)
            if self.stop_when_done and len(self._seen) == len(self.layers):
                raise _StopForward

        return hook

    @contextmanager
    def attached(self) -> Iterator[_StatisticsCollector]:
        handles = [
            layer.module.register_forward_pre_hook(self._hook(layer.name), with_kwargs=True) for layer in self.layers
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._cache.clear()

    def tensors(self) -> list[Tensor]:
        """All statistic tensors, in a fixed order, for an all-reduce."""
        return [t for group in self.statistics.values() for stats in group.values() for t in stats.state_tensors()]

    def num_tokens(self, name: str) -> int:
        return max((stats.num_tokens for stats in self.statistics[name].values()), default=0)


def _sanitize(value: Any) -> Any:
    """Drops key/value caches from captured block arguments: calibration never caches."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is optional
        return value
    return None if isinstance(value, Cache) else value


def _first_output(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"a block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def _run_block(block: nn.Module, record: _BlockInput, device: torch.device) -> Tensor:
    hidden = record.hidden.to(device, non_blocking=True)
    args = move_to(record.args, device)
    kwargs = move_to(record.kwargs, device)
    if record.hidden_positional:
        return _first_output(block(hidden, *args, **kwargs))
    return _first_output(block(*args, hidden_states=hidden, **kwargs))


def _module_device(module: nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


def _as_device(value: str | torch.device | None, argument: str) -> torch.device | None:
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"`{argument}` must be a torch device such as 'cpu' or 'cuda:0', got {value!r}") from None


def _check_positive(value: int | None, argument: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive integer or None, got {value!r}")


class _Pruner:
    """One ``prune()`` call's state; see :func:`prune` for the semantics."""

    def __init__(
        self,
        model: nn.Module,
        method: PruningMethod,
        structure: SparsityStructure,
        targets: list[TargetLayer],
        report: PruningReport,
        forward_fn: ForwardFn,
        device: torch.device | None,
        offload_device: torch.device | None,
        progress: bool,
        sync_statistics: StatisticsSync | None,
        on_layer_pruned: LayerCallback | None,
        allocation: OWL | None = None,
        refinement: DSnoT | None = None,
        layout: ShardedLayout | None = None,
        source: SafetensorsCheckpoint | None = None,
        on_block_pruned: BlockCallback | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.source = source
        self.on_block_pruned = on_block_pruned
        # Under FSDP2 every rank must run every block forward to its end: the all-gathers stay in lock-step, and a
        # forward cut short by an exception would leave the block unsharded.
        self.stop_early = layout is None
        self.method = method
        self.allocation = allocation
        self.refinement = refinement
        self.layer_sparsity: dict[str, float] | None = None
        self.factories: dict[str, StatisticsFactory] = {"method": method.new_statistics}
        if refinement is not None:
            self.factories["refine"] = refinement.new_statistics
        self.structure = structure
        self.targets = targets
        self.report = report
        self.forward_fn = forward_fn
        self.device = device
        self.offload_device = offload_device
        self.progress = progress
        self.sync_statistics = sync_statistics
        self.on_layer_pruned = on_layer_pruned
        self.pruned_blocks = 0

    # --- pruning ---------------------------------------------------------------------------------------------------

    def _validate_statistics(self, collector: _StatisticsCollector, where: str) -> None:
        unreached = [name for name in collector.statistics if collector.num_tokens(name) == 0]
        if unreached:
            raise ValueError(
                f"no calibration token reached target layer(s) {unreached}{where}; leave them out with `ignore`, or "
                "check that `forward_fn` runs them (a layer is never silently pruned by magnitude instead)"
            )
        for name, group in collector.statistics.items():
            for tensor in (t for stats in group.values() for t in stats.state_tensors()):
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise FloatingPointError(
                        f"the calibration statistics of layer {name!r} contain NaN or Inf{where}: its inputs overflow "
                        "or are not finite (try float32 or bfloat16 instead of float16)"
                    )

    def _sync(self, collector: _StatisticsCollector) -> None:
        if self.sync_statistics is not None:
            self.sync_statistics(collector.tensors())

    def _layer_sparsity(self, layer: TargetLayer) -> float:
        if self.layer_sparsity is not None and layer.name in self.layer_sparsity:
            return self.layer_sparsity[layer.name]
        return self.structure.sparsity

    def _prune_layers(
        self,
        layers: Sequence[TargetLayer],
        statistics: dict[str, dict[str, LayerStatistics]] | None,
        blocks: BlockStack | None,
    ) -> None:
        if self.layout is not None:
            reshard_fsdp_modules(self.model)  # masks go to the sharded parameters, not to unsharded copies
        if self.method.permute_channels and self.structure.is_n_m and statistics is not None:
            self._permute_channels(layers, statistics)
        for layer in with_full_weights(layers, self.layout):
            start = time.perf_counter()
            group = statistics.pop(layer.name, {}) if statistics is not None else {}
            weight = layer.weight_2d
            sparsity = self._layer_sparsity(layer)
            dense = weight.float().clone() if self.refinement is not None else None
            try:
                keep = self.method.prune_layer(weight, group.get("method"), self.structure, sparsity)
            except FloatingPointError as error:
                raise FloatingPointError(f"layer {layer.name!r}: {error}") from None
            except torch.linalg.LinAlgError as error:
                raise ValueError(f"layer {layer.name!r}: {error}; exclude it with `ignore`") from None
            self.report.scoring_seconds += time.perf_counter() - start
            if self.refinement is not None and dense is not None:
                start = time.perf_counter()
                keep = self.refinement.refine(dense, weight, keep, group["refine"], self.structure)
                del dense
                self.report.refine_seconds += time.perf_counter() - start
            num_pruned = int(keep.numel() - keep.sum())
            if self.on_layer_pruned is not None:
                self.on_layer_pruned(layer.name, keep)
            self.report.layers.append(
                LayerReport(
                    name=layer.name,
                    kind=layer.kind,
                    shape=layer.shape,
                    sparsity=num_pruned / keep.numel(),
                    target_sparsity=sparsity,
                    num_pruned=num_pruned,
                    num_tokens=max((s.num_tokens for s in group.values()), default=0),
                    block=blocks.index_of(layer.name) if blocks is not None else None,
                )
            )
            del keep, group
        # Under a caller's torch.autocast with its weight cache on, cached low-precision copies of the weights just
        # pruned would keep feeding later passes with dense values.
        torch.clear_autocast_cache()

    def _permute_channels(
        self, layers: Sequence[TargetLayer], statistics: dict[str, dict[str, LayerStatistics]]
    ) -> None:
        """Reorders the input channels of the layers whose producers are among the model's modules (see
        :mod:`~wanda_lightning.channels`), before any of ``layers`` is pruned: the producers' masks then follow."""
        start = time.perf_counter()
        couplings = find_channel_couplings(self.model, [layer.name for layer in layers])
        for layer in layers:
            coupling, group = couplings.get(layer.name), statistics.get(layer.name)
            if coupling is None or not group:
                continue
            index = self.method.channel_order(layer.weight_2d, group.get("method"), self.structure)
            if index is None:
                continue
            coupling.permute(layer.weight_2d, index)
            for stats in group.values():
                stats.permute_inputs(index)
            self.report.permuted_layers.append(layer.name)
        self.report.scoring_seconds += time.perf_counter() - start

    # --- calibration -----------------------------------------------------------------------------------------------

    def _forward(self, batch: Any) -> None:
        self.forward_fn(self.model, move_to(batch, input_device(self.model)))

    def _one_shot_statistics(
        self, layers: Sequence[TargetLayer], batches: list[Any], factories: dict[str, StatisticsFactory] | None = None
    ) -> _StatisticsCollector:
        start = time.perf_counter()
        collector = _StatisticsCollector(layers, factories or self.factories, stop_when_done=self.stop_early)
        with collector.attached():
            for batch in tqdm(batches, desc="calibrating", disable=not self.progress, leave=False):
                collector.start_batch(token_mask_of(batch), batch_size_of(batch))
                with suppress(_StopForward):
                    self._forward(batch)
        self.report.calibration_seconds += time.perf_counter() - start
        return collector

    def allocate(self, batches: list[Any], stack: BlockStack | None) -> None:
        """OWL: per-block sparsities from the outlier share of Wanda scores in one dense calibration pass."""
        assert self.allocation is not None
        start = time.perf_counter()
        seconds = self.report.calibration_seconds
        collector = self._one_shot_statistics(self.targets, batches, {"owl": InputNormStatistics})
        self.report.calibration_seconds = seconds
        self._sync(collector)
        self._validate_statistics(collector, "")
        groups: dict[str, list[TargetLayer]] = {}
        for layer in self.targets:
            index = stack.index_of(layer.name) if stack is not None else None
            if stack is not None and index is None:
                continue  # layers outside the block stack keep the target sparsity
            key = stack.block_name(index) if stack is not None and index is not None else layer.name
            groups.setdefault(key, []).append(layer)
        scorer = Wanda()
        layout = self.layout
        reduce = (lambda tensor: layout.all_reduce([tensor])) if layout is not None else None  # sharded: whole weights
        ratios = []
        for layers in groups.values():
            scores = [
                scorer.score(layer.weight_2d, collector.statistics[layer.name]["owl"])
                for layer in with_full_weights(layers, self.layout)
            ]
            ratios.append(owl_outlier_ratio(scores, self.allocation.m, reduce))
            del scores
        sparsities = owl_sparsities(ratios, self.structure.sparsity, self.allocation.lam)
        self.layer_sparsity = {}
        for (key, layers), sparsity, ratio in zip(groups.items(), sparsities, ratios, strict=True):
            self.report.block_sparsity[key] = sparsity
            self.report.outlier_ratios[key] = ratio
            for layer in layers:
                self.layer_sparsity[layer.name] = sparsity
        self.report.allocation_seconds += time.perf_counter() - start

    def run_without_data(self, blocks: BlockStack | None) -> None:
        self._prune_layers(self.targets, None, blocks)

    def run_one_shot(self, batches: list[Any], blocks: BlockStack | None) -> None:
        collector = self._one_shot_statistics(self.targets, batches)
        self._sync(collector)
        self._validate_statistics(collector, "")
        self._prune_layers(self.targets, collector.statistics, blocks)

    def _capture(
        self, stack: BlockStack, batches: list[Any], before: Sequence[TargetLayer]
    ) -> tuple[list[_BlockInput], _StatisticsCollector | None]:
        first = stack.blocks[0]

        def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _BlockInputsCaptured(args, kwargs)

        collector = _StatisticsCollector(before, self.factories, stop_when_done=False) if before else None
        records: list[_BlockInput] = []
        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in batches:
                if collector is not None:
                    collector.start_batch(token_mask_of(batch), batch_size_of(batch))
                try:
                    if collector is not None:
                        with collector.attached():
                            self._forward(batch)
                    else:
                        self._forward(batch)
                except _BlockInputsCaptured as captured:
                    records.append(self._record(captured, batch))
                else:
                    raise ValueError(
                        f"the calibration forward never reached the first block `{stack.block_name(0)}`; pass "
                        "`forward_fn` to run the model on your batches, or sequential=False"
                    )
        finally:
            handle.remove()
            if self.layout is not None:
                reshard_fsdp_modules(self.model)  # the capture stopped the root's forward inside it
        return records, collector

    def _record(self, captured: _BlockInputsCaptured, batch: Any) -> _BlockInput:
        args = tuple(_sanitize(a) for a in captured.args)
        kwargs = {k: _sanitize(v) for k, v in captured.kwargs.items()}
        for key in _CACHE_KWARGS:
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if "output_attentions" in kwargs:
            kwargs["output_attentions"] = False
        if args:
            hidden, rest, positional = args[0], args[1:], True
        elif isinstance(kwargs.get("hidden_states"), Tensor):
            hidden, rest, positional = kwargs.pop("hidden_states"), (), False
        else:
            raise TypeError("could not find the hidden states among the first block's arguments")
        return _BlockInput(
            hidden=move_to(hidden, self.offload_device),
            hidden_positional=positional,
            args=move_to(rest, self.offload_device),
            kwargs=move_to(kwargs, self.offload_device),
            token_mask=token_mask_of(batch),
            num_sequences=batch_size_of(batch),
        )

    def run_sequential(self, stack: BlockStack, batches: list[Any]) -> None:
        by_block: dict[int, list[TargetLayer]] = {}
        outside: list[TargetLayer] = []
        for layer in self.targets:
            index = stack.index_of(layer.name)
            if index is None:
                outside.append(layer)
            else:
                by_block.setdefault(index, []).append(layer)

        # Layers outside the stack that run before it see their (dense) inputs during the capture pass.
        start = time.perf_counter()
        records, before = self._capture(stack, batches, outside)
        self.report.calibration_seconds += time.perf_counter() - start
        after = list(outside)
        if before is not None:
            reached = {name for name in before.statistics if before.num_tokens(name) > 0}
            early = [layer for layer in outside if layer.name in reached]
            after = [layer for layer in outside if layer.name not in reached]
            before.layers = early
            before.statistics = {layer.name: before.statistics[layer.name] for layer in early}
            self._sync(before)
            self._validate_statistics(before, "")
            self._prune_layers(early, before.statistics, stack)

        last = len(stack.blocks) - 1
        for index, block in enumerate(tqdm(stack.blocks, desc="pruning blocks", disable=not self.progress)):
            layers = by_block.get(index, [])
            streamed = self.source is not None and bool(meta_tensor_names(block))
            if streamed:
                assert self.source is not None
                home = self.device or input_device(self.model)
                self.source.materialize(block, f"{stack.block_name(index)}.", home)
                _check_finite(layers, f" (read from the checkpoint for block {index}){self._already_pruned()}")
            else:
                home = _module_device(block)
            compute = self.device or home or records[0].hidden.device
            if self.device is not None and home is not None and home != self.device:
                block.to(self.device)
            try:
                if layers:
                    self._calibrate_and_prune_block(block, index, layers, records, compute, stack)
                if index < last:
                    start = time.perf_counter()
                    for record in records:
                        record.hidden = move_to(_run_block(block, record, compute), self.offload_device)
                    self.report.calibration_seconds += time.perf_counter() - start
            finally:
                if streamed and self.offload_device is not None:
                    block.to(self.offload_device)
                elif not streamed and self.device is not None and home is not None and home != self.device:
                    block.to(home)
            self.pruned_blocks = index + 1
            if self.on_block_pruned is not None:
                self.on_block_pruned(stack.block_name(index), block)
        del records

        if after:
            # Layers after the stack (say an explicitly targeted head) are calibrated on the pruned model.
            collector = self._one_shot_statistics(after, batches)
            self._sync(collector)
            self._validate_statistics(collector, self._already_pruned())
            self._prune_layers(after, collector.statistics, stack)

    def _already_pruned(self) -> str:
        if not self.report.layers:
            return ""
        return f" (blocks 0-{self.pruned_blocks - 1} were already pruned; no later weight was changed)"

    def _calibrate_and_prune_block(
        self,
        block: nn.Module,
        index: int,
        layers: list[TargetLayer],
        records: list[_BlockInput],
        compute: torch.device,
        stack: BlockStack,
    ) -> None:
        start = time.perf_counter()
        collector = _StatisticsCollector(layers, self.factories, stop_when_done=self.stop_early)
        with collector.attached():
            for record in records:
                collector.start_batch(record.token_mask, record.num_sequences)
                with suppress(_StopForward):
                    _run_block(block, record, compute)
        self.report.calibration_seconds += time.perf_counter() - start
        self._sync(collector)
        self._validate_statistics(collector, f" in block {index}" + self._already_pruned())
        self._prune_layers(layers, collector.statistics, stack)


def prune(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    structure: str = "unstructured",
    method: str | PruningMethod = "wanda",
    allocation: str | OWL | None = None,
    refine: str | DSnoT | None = None,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    sequential: bool = True,
    blocks: str | None = None,
    num_samples: int | None = 128,
    batch_size: int | None = None,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = None,
    offload_device: str | torch.device | None = None,
    progress: bool = False,
    sync_statistics: StatisticsSync | None = None,
    on_layer_pruned: LayerCallback | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    on_block_pruned: BlockCallback | None = None,
) -> PruningReport:
    """Prunes ``model`` in place with Wanda (or another method) and reports what it did.

    Block-sequential calibration (the default when a stack of repeated blocks is found) follows the Wanda reference
    code: the first block's inputs are captured by running the model up to it; then, for each block, the statistics
    of all its target layers come from one pass of the dense block, they are all pruned, and the pruned block runs
    again to make the next block's inputs. One-shot calibration (``sequential=False``, or no block stack) runs the
    model once with hooks on every target layer, then prunes them all. Data-free methods (``"magnitude"``) ignore
    ``calibration``.

    Args:
        model: Any module: a Hugging Face causal LM (Llama, Mistral, Qwen2, OPT, GPT-NeoX, GPT-2, Phi, ...), a
            LightningModule wrapping one, or a plain module built of ``nn.Linear`` layers.
        calibration: Iterable of batches or a ``DataLoader``. Batches are fed as ``model(**batch)`` (mapping),
            ``model(batch[0])`` (tuple or list) or ``model(batch)`` (tensor) unless ``forward_fn`` is given. Tokens
            whose ``attention_mask`` is 0 in a mapping batch do not count.
        sparsity: Fraction of weights to zero in every output row, in ``[0, 1)``; default 0.5 when unstructured,
            implied by N:M structures.
        structure: ``"unstructured"`` or ``"N:M"`` (N of every M consecutive input weights are kept).
        method: ``"wanda"``, ``"magnitude"``, ``"sparsegpt"``, ``"ria"``, ``"ria-permuted"`` (N:M with RIA's channel
            permutation of each MLP's hidden units, see :class:`~wanda_lightning.RIA`), another registered name, or a
            :class:`PruningMethod` instance such as ``Wanda(variant=True)`` or ``RIA(a=0.5)``.
        allocation: ``None``/``"uniform"`` (every layer at ``sparsity``) or ``"owl"`` / ``OWL(m, lam)``: per-block
            sparsities from the outlier share of Wanda scores in an extra dense calibration pass (mean = target;
            unstructured only). The per-block values are in the report.
        refine: ``None`` or DSnoT's training-free swaps of pruned and kept weights after each layer's mask:
            ``"dsnot"`` / ``"dsnot-expected"`` (swaps that lower the expected output error under DSnoT's input model;
            Wanda's calibration cost), ``"dsnot-exact"`` (swaps that lower the exact reconstruction error; collects
            each layer's Gram matrix), ``"dsnot-unguarded"`` (the paper's rules alone) or a ``DSnoT(...)`` instance.
        targets: Name patterns (glob, or ``re:`` regex) of the layers to prune; default every ``nn.Linear`` and
            transformers ``Conv1D``.
        ignore: Name patterns to leave alone; default ``["lm_head"]``. Weights shared with an embedding are always
            left alone. Skipped layers and reasons are in the report.
        sequential: Block-sequential calibration when a block stack exists (default); ``False`` for one-shot.
        blocks: Module name of the block stack (``"model.layers"``); found automatically when ``None``.
        num_samples: Most calibration sequences used (default 128, as the reference code); ``None`` for all.
        batch_size: Sequences per forward pass; ``None`` keeps the calibration iterable's batches.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch, for models whose forward does not take
            the batch as is.
        device: Compute device for blocks; a block living elsewhere is moved there while it is pruned and moved back.
            ``None`` runs each block where it is.
        offload_device: Where captured block inputs wait between blocks (say ``"cpu"``); ``None`` keeps them where
            they were computed.
        progress: Show a progress bar over blocks.
        sync_statistics: Called with each block's statistic tensors (sums) before masks are computed; distributed
            callers pass an in-place all-reduce so that every process computes the same masks.
        on_layer_pruned: Called as ``on_layer_pruned(name, keep_mask)`` after each layer is pruned (for a weight
            sharded by FSDP2, the mask of this process's rows).
        checkpoint: For a model built on the meta device (``accelerate.init_empty_weights()``), the ``.safetensors``
            file or folder its weights come from, named as in ``model.state_dict()``. Tensors outside the block stack
            are read first (onto ``device``, default CPU); each block's just before it is calibrated, so memory holds
            the calibration activations, the non-block tensors and the blocks not yet released. With
            ``offload_device`` a pruned block moves there; :class:`~wanda_lightning.streaming.BlockSaver` as
            ``on_block_pruned`` writes it out and releases it instead. Needs block-sequential calibration and no
            ``allocation``.
        on_block_pruned: Block-sequential mode: called as ``on_block_pruned(block_name, block)`` once a block is
            pruned and has produced the next block's inputs (say, to save it and free its memory).

    Returns:
        A :class:`PruningReport`.

    Raises:
        ValueError, TypeError: For bad arguments, before any weight changes (see the messages).
        FloatingPointError: For non-finite target weights (before any change) or non-finite calibration statistics.
            Calibration problems (a target layer no token reached, non-finite statistics) are found block by
            block: an error raised for block *k* leaves blocks after it untouched, while blocks before *k* (and
            layers before the stack) are already pruned; the message says so. In one-shot mode no weight has changed
            (except that a channel permutation, see ``"ria-permuted"``, may already have reordered MLP hidden units,
            which leaves the model's function as it was).

    The model keeps its train/eval modes, dtype and devices, also when an error is raised; hooks are always removed
    and no autograd graph is built.

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
    total_start = time.perf_counter()
    parsed = parse_structure(structure, sparsity)
    pruning_method = get_method(method)
    owl = get_allocation(allocation)
    refinement = get_refinement(refine)
    _check_positive(num_samples, "num_samples")
    _check_positive(batch_size, "batch_size")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"`forward_fn` must be callable as forward_fn(model, batch), got {forward_fn!r}")
    if not isinstance(sequential, bool):
        raise TypeError(f"`sequential` must be a bool, got {sequential!r}")
    compute_device = _as_device(device, "device")
    offload = _as_device(offload_device, "offload_device")
    meta = meta_tensor_names(model)
    source: SafetensorsCheckpoint | None = None
    if meta and checkpoint is None:
        raise ValueError(
            f"parameters on the meta device cannot be pruned: {meta[:5]}{' ...' if len(meta) > 5 else ''}; load or "
            "materialise the weights first, or pass `checkpoint` (their safetensors file or folder)"
        )
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"`checkpoint` must be a path to a .safetensors file or folder, got {checkpoint!r}")
        source = SafetensorsCheckpoint(checkpoint)
        tie_weights = getattr(model, "tie_weights", None)
        if meta and callable(tie_weights):
            # As from_pretrained does: a tied head is stored once (under the embeddings) in the checkpoint.
            tie_weights()
        missing = source.missing(model)
        if missing:
            raise ValueError(
                f"`checkpoint`={str(checkpoint)!r} has no tensor {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                "for the model's meta parameters or buffers (names as in model.state_dict()); build the model with "
                "accelerate's init_empty_weights(), which keeps buffers such as rotary tables real"
            )
    if on_block_pruned is not None and not callable(on_block_pruned):
        raise TypeError(
            f"`on_block_pruned` must be callable as on_block_pruned(block_name, block), got {on_block_pruned!r}"
        )
    layers, skipped = find_targets(model, targets, ignore)
    layout = sharded_layout(layers) or fsdp1_layout(model, layers)
    if layout is not None:
        _check_shardable(layout, pruning_method, parsed, compute_device)
    if pruning_method.permute_channels and not parsed.is_n_m:
        raise ValueError(
            f"`method`={pruning_method.describe()!r} permutes input channels to form better N:M groups, which "
            f"`structure`={parsed.name!r} does not have; use an N:M structure such as '2:4', or method='ria'"
        )
    if pruning_method.permute_channels and layout is not None:
        raise ValueError(
            f"`method`={pruning_method.describe()!r} reorders the hidden units of whole MLPs, whose weights are split "
            f"across {layout.world_size} processes here; prune before sharding, or use method='ria'"
        )
    # Meta weights are checked once read; FSDP1 ones (not readable outside summon_full_params, whose storage may be
    # freed) when their unit's full parameters are summoned: the scores are checked before anything is written.
    unreadable = set(layout.fsdp1_owners) if layout is not None else set()
    _check_finite([t for t in layers if t.name not in unreadable and not t.weight_2d.is_meta], "", layout)
    if parsed.is_n_m:
        assert parsed.m is not None
        bad = [f"{t.name} (in_features={t.in_features})" for t in layers if t.in_features % parsed.m]
        if bad:
            raise ValueError(
                f"`structure`={parsed.name!r} needs in_features to be a multiple of {parsed.m}; not so for {bad}; "
                "leave these layers out with `ignore`"
            )
    stack = find_block_stack(model, layers, blocks) if (sequential or blocks is not None) else None
    use_sequential = sequential and stack is not None
    if use_sequential and layout is not None and layout.fsdp1_owners:
        warnings.warn(
            "FSDP1 (FullyShardedDataParallel) models are calibrated in one pass over the whole model: block-sequential "
            "calibration would stop FSDP1 forwards midway. Pass sequential=False to silence this, or use FSDP2 "
            "(fully_shard), which supports block-sequential calibration",
            stacklevel=2,
        )
        use_sequential = False
    if owl is not None and parsed.is_n_m:
        raise ValueError(
            f"`allocation`='owl' gives blocks different sparsities, which `structure`={parsed.name!r} fixes at "
            f"{parsed.sparsity:g} for every group of {parsed.m}; use structure='unstructured' with OWL"
        )
    needs_data = pruning_method.requires_calibration or owl is not None or refinement is not None
    if source is not None and meta:
        if owl is not None:
            raise ValueError(
                "`allocation`='owl' scores every block on the dense model before pruning the first, which a model "
                "read block by block from `checkpoint` cannot do; load the model, or use allocation=None"
            )
        if not (use_sequential and needs_data):
            source.materialize(model, "", compute_device)  # no block-by-block pass to stream into: read everything
            _check_finite(layers, " (read from the checkpoint)")
        else:
            assert stack is not None
            source.materialize(model, "", compute_device, exclude=f"{stack.name}." if stack.name else None)
    batches: list[Any] = []
    if needs_data:
        if calibration is None:
            wanted = [pruning_method.describe()] if pruning_method.requires_calibration else []
            wanted += [x.describe() for x in (owl, refinement) if x is not None]
            raise ValueError(f"{' + '.join(wanted)} needs `calibration` batches, got None")
        batches = prepare_batches(calibration, num_samples, batch_size)
        if layout is not None:
            batches = _same_count_on_every_rank(batches, layout)
    if layout is not None and sync_statistics is None:
        sync_statistics = layout.all_reduce  # in-place sums over the weights' process group

    report = PruningReport(
        method=pruning_method.describe(),
        allocation=owl.describe() if owl is not None else None,
        refinement=refinement.describe() if refinement is not None else None,
        structure=parsed.name,
        target_sparsity=parsed.sparsity,
        sequential=use_sequential and needs_data,
        block_stack=stack.name if use_sequential and stack is not None else None,
        num_samples=sum(batch_size_of(b) for b in batches),
        num_batches=len(batches),
        skipped=[SkippedLayer(name, reason) for name, reason in skipped],
    )
    pruner = _Pruner(
        model=model,
        method=pruning_method,
        structure=parsed,
        targets=layers,
        report=report,
        forward_fn=forward_fn or default_forward,
        device=compute_device,
        offload_device=offload,
        progress=progress,
        sync_statistics=sync_statistics,
        on_layer_pruned=on_layer_pruned,
        allocation=owl,
        refinement=refinement,
        layout=layout,
        source=source if use_sequential and needs_data else None,
        on_block_pruned=on_block_pruned,
    )
    modes = [(module, module.training) for module in model.modules()]
    configs: list[Any] = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    caches = [config.use_cache for config in configs]
    try:
        model.eval()
        for config in configs:
            config.use_cache = False
        with torch.no_grad():
            if owl is not None:
                pruner.allocate(batches, stack if use_sequential else None)
            if not needs_data:
                pruner.run_without_data(stack)
            elif use_sequential and stack is not None:
                pruner.run_sequential(stack, batches)
            else:
                pruner.run_one_shot(batches, stack)
    finally:
        for module, training in modes:
            module.training = training
        for config, cached in zip(configs, caches, strict=True):
            config.use_cache = cached
    if layout is not None and layout.sharded_layers:
        _gather_layer_counts(report, layout)
    report.total_seconds = time.perf_counter() - total_start
    return report


def _check_finite(layers: Sequence[TargetLayer], where: str, layout: ShardedLayout | None = None) -> None:
    """Raises if a target weight is NaN or Inf; with a sharded ``layout`` every rank raises, or none does."""
    bad = [t.name for t in layers if not bool(torch.isfinite(t.weight_2d).all())]
    flag = torch.tensor([float(len(bad))])
    if layout is not None:
        layout.all_reduce([flag], "max")
    if float(flag) > 0:
        names = bad or "(in another process's shards)"
        raise FloatingPointError(
            f"target layer(s) {names} have weights that are not finite (NaN or Inf){where}; fix them or leave them out "
            "with `ignore`"
        )


def _check_shardable(
    layout: ShardedLayout, method: PruningMethod, structure: SparsityStructure, device: torch.device | None
) -> None:
    if layout.sharded_layers and not method.shard_local(structure):
        raise ValueError(
            f"`method`={method.describe()!r} with `structure`={structure.name!r} compares weights across output rows, "
            f"and layer(s) {layout.sharded_layers[:3]} are split by rows across {layout.world_size} processes "
            "(FSDP2); use 'wanda', 'magnitude' or an N:M structure with 'sparsegpt', or prune before sharding"
        )
    if device is not None:
        raise ValueError(
            f"`device`={str(device)!r} moves blocks between devices, which FSDP2 manages for sharded weights; "
            "leave `device` at None"
        )


def _same_count_on_every_rank(batches: list[Any], layout: ShardedLayout) -> list[Any]:
    """Truncates to the fewest batches any rank has: FSDP2 all-gathers every block's weights in each forward, so a
    rank running one more forward than the others would wait for them forever."""
    counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64)
    layout.all_reduce([counts], "min")
    fewest, most = int(counts[0]), -int(counts[1])
    if fewest == 0:
        raise ValueError(
            f"calibration gave no batch on at least one of {layout.world_size} processes; every process needs some"
        )
    if fewest != most:
        warnings.warn(
            f"calibration batch counts differ across processes ({fewest} to {most}); every process uses its first "
            f"{fewest} so that sharded forwards stay in step",
            stacklevel=3,
        )
    return batches[:fewest]


def _gather_layer_counts(report: PruningReport, layout: ShardedLayout) -> None:
    """Sums each layer's pruned count over the ranks' row shards, so the report describes whole weights."""
    sharded = set(layout.sharded_layers)
    entries = [entry for entry in report.layers if entry.name in sharded]
    counts = torch.tensor([float(entry.num_pruned) for entry in entries], dtype=torch.float64)
    layout.all_reduce([counts], "sum")
    for entry, count in zip(entries, counts.tolist(), strict=True):
        entry.num_pruned = int(count)
        entry.sparsity = entry.num_pruned / (entry.shape[0] * entry.shape[1])
