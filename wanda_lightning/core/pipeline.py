"""The calibration pipeline: run the model on calibration batches, block by block, and hand each block's statistics to
an action.

Block-sequential calibration follows the Wanda reference code: the first block's inputs are captured by running the
model up to it; then, for each block, the statistics of its layers come from one pass of the unchanged block, the
:class:`Action` changes the block (masks its weights, removes units, rewrites weights), and the changed block runs
again to make the next block's inputs. One-shot calibration runs the model once with hooks on every layer and hands
everything to the action at once.

The pipeline knows nothing of what the action does. It owns what every action needs: capturing block inputs whatever
the first block receives (rotary ``position_embeddings``, masks, position ids), statistics hooks, moving blocks to a
compute device and inputs to an offload device, reading meta-device blocks from a checkpoint as they come, summing
statistics across processes, keeping sharded forwards in step, and leaving the model's modes as it found them.

Example::

    class CountTokens(Action):
        def statistics(self, layer):
            return {"norms": InputNormStatistics}
        def apply(self, step):
            for layer in step.layers:
                print(layer.name, step.take(layer.name)["norms"].num_tokens)

    pipeline = CalibrationPipeline(model, layers, stack=find_block_stack(model, layers))
    pipeline.run(CountTokens(), prepare_batches(batches, None, None))
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed.sharding import ShardedLayout, reshard_fsdp_modules, with_full_weights
from ..distributed.streaming import SafetensorsCheckpoint, meta_tensor_names
from .batches import ForwardFn, batch_size_of, default_forward, input_device, move_to, token_mask_of
from .blocks import BlockStack
from .collector import StatisticsCollector, StatisticsFactory, StopForward
from .layers import module_device
from .reconstruction import BlockFit, Reconstruction, reconstruct_block
from .statistics import LayerStatistics
from .target_layer import TargetLayer

__all__ = [
    "Action",
    "BlockCallback",
    "BlockObserver",
    "CalibrationPipeline",
    "StatisticsSync",
    "Step",
    "calibration_mode",
    "check_finite",
]

StatisticsSync = Callable[[list[Tensor]], None]
"""Sums statistic tensors across processes in place (an all-reduce), so that every process acts alike."""
BlockCallback = Callable[[str, nn.Module], None]
"""Called as ``callback(block_name, block)`` once a block is done and has produced the next block's inputs."""

BlockObserver = Callable[[int, list[Tensor], list[Tensor], list["Tensor | None"]], None]
"""Called as ``observe(block_index, inputs, outputs, token_masks)`` by :meth:`CalibrationPipeline.trace`: one entry
per calibration batch, the hidden states going into and out of the block and the batch's mask of counted tokens."""

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


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


@dataclass
class Step:
    """Layers whose statistics are ready, handed to :meth:`Action.apply`: one block's, the layers before or after the
    block stack, or every layer at once (one-shot).

    Attributes:
        layers: The layers, in model order.
        statistics: Their statistics by layer name and key (as :meth:`Action.statistics` asked); ``None`` when the
            action needs no data.
        stack: The block stack, when the model has one (block-sequential or not).
        block: The block these layers belong to, or ``None``.
        block_index: Its index in ``stack``, or ``None``.
    """

    layers: list[TargetLayer]
    statistics: dict[str, dict[str, LayerStatistics]] | None
    stack: BlockStack | None
    block: nn.Module | None = None
    block_index: int | None = None
    layout: ShardedLayout | None = None

    def take(self, name: str) -> dict[str, LayerStatistics]:
        """Removes and returns the statistics of layer ``name`` (empty without data), so that they are freed as soon
        as the caller drops them."""
        return self.statistics.pop(name, {}) if self.statistics is not None else {}

    def writable(self, layers: Sequence[TargetLayer] | None = None) -> Iterator[TargetLayer]:
        """Yields ``layers`` (default: all of this step's) with their full weights writable: under FSDP1 while the
        owning unit's parameters are summoned and written back. Every process must iterate the same layers."""
        return with_full_weights(self.layers if layers is None else list(layers), self.layout)

    def block_of(self, layer: TargetLayer) -> int | None:
        """Index of the block holding ``layer``, or ``None`` outside the stack."""
        return self.stack.index_of(layer.name) if self.stack is not None else None


class Action(ABC):
    """What the pipeline hands statistics to: masks weights, removes units, rewrites weights.

    Subclasses say which statistics each layer needs (:meth:`statistics`), may run a pass of their own first
    (:meth:`prepare`), and change the model in :meth:`apply`, called once per :class:`Step`.
    """

    #: Past tense of what the action does to a block, for error messages ("blocks 0-3 were already pruned").
    verb: ClassVar[str] = "changed"

    def statistics(self, layer: TargetLayer) -> Mapping[str, StatisticsFactory]:
        """``{key: factory}`` of the statistics ``layer`` needs; empty when it needs none."""
        return {}

    @property
    def needs_data(self) -> bool:
        """Whether the main pass needs calibration batches (``False``: one :meth:`apply` on every layer)."""
        return True

    def prepare(self, pipeline: CalibrationPipeline, batches: list[Any]) -> None:  # noqa: B027 - optional
        """Runs before the main pass (say, a dense pass of its own through :meth:`CalibrationPipeline.collect`)."""

    @abstractmethod
    def apply(self, step: Step) -> None:
        """Changes the model for one step's layers, from their statistics."""

    def reconstructed(self, step: Step) -> list[tuple[nn.Parameter, Tensor | None]]:
        """What block reconstruction trains after :meth:`apply` changed ``step``'s block: ``(parameter, held)`` pairs,
        ``held`` a boolean mask of the weights that must stay zero (or ``None``). Default: the weights and biases of
        the step's layers."""
        return [(p, None) for layer in step.layers for p in layer.module.parameters(recurse=False)]


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no key/value caches, no autograd and no fused attention fast paths for the ``with`` block; modes,
    caches and the fast-path setting are restored after, also when an error is raised.

    Torch's fast paths (``torch.backends.mha``) run ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` as
    one fused kernel in eval mode without autograd: their linear layers' hooks would never see an input.

    Example::

        >>> net = nn.Linear(2, 2).train()
        >>> with calibration_mode(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    modes = [(module, module.training) for module in model.modules()]
    configs: list[Any] = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    caches = [config.use_cache for config in configs]
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        model.eval()
        for config in configs:
            config.use_cache = False
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for config, cached in zip(configs, caches, strict=True):
            config.use_cache = cached
        torch.backends.mha.set_fastpath_enabled(fast_path)


def check_finite(layers: Sequence[TargetLayer], where: str, layout: ShardedLayout | None = None) -> None:
    """Raises if a layer's weight is NaN or Inf; with a sharded ``layout`` every rank raises, or none does.

    Raises:
        FloatingPointError: Naming the layers.

    Example::

        >>> from wanda_lightning.core.targets import find_targets
        >>> check_finite(find_targets(nn.Sequential(nn.Linear(2, 2)))[0], "")
    """
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


def _same(value: Any) -> Any:
    return value


def _run_block(
    block: nn.Module,
    record: _BlockInput,
    device: torch.device,
    hidden: Tensor | None = None,
    cast: Callable[[Any], Any] = _same,
) -> Tensor:
    """``block``'s output hidden states on ``record`` (or on ``hidden`` with ``record``'s other inputs), with ``cast``
    applied to every input."""
    hidden = cast((record.hidden if hidden is None else hidden).to(device, non_blocking=True))
    args = cast(move_to(record.args, device))
    kwargs = cast(move_to(record.kwargs, device))
    if record.hidden_positional:
        return _first_output(block(hidden, *args, **kwargs))
    return _first_output(block(*args, hidden_states=hidden, **kwargs))


class CalibrationPipeline:
    """Runs calibration for an :class:`Action` over ``layers`` of ``model`` (see the module docstring).

    Args:
        model: The model; it must be in :func:`calibration_mode` while :meth:`run` or :meth:`collect` runs (``run``
            enters it itself).
        layers: The layers whose statistics the action gets.
        stack: The block stack, or ``None``.
        sequential: Block-sequential calibration through ``stack`` (ignored without one).
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch.
        device: Compute device for blocks (moved there while calibrated, then back); ``None`` runs them in place.
        offload_device: Where captured block inputs wait between blocks; ``None`` keeps them where computed.
        sync_statistics: In-place all-reduce of statistic tensors before they are used.
        layout: How the weights are sharded across processes (FSDP), or ``None``.
        source: For meta-device blocks: the checkpoint each block is read from just before it is calibrated.
        on_block_done: Called as ``on_block_done(block_name, block)`` after each block.
        progress: Show a progress bar over blocks.
        reconstruction: Block-sequential only: after the action changed a block, train what
            :meth:`Action.reconstructed` names to reproduce the dense block's outputs (see
            :mod:`~wanda_lightning.core.reconstruction`). The dense outputs come from a second stream of hidden states
            through the blocks as they were, so each block also makes up for the error of the blocks before it.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[TargetLayer],
        *,
        stack: BlockStack | None,
        sequential: bool = True,
        forward_fn: ForwardFn | None = None,
        device: torch.device | None = None,
        offload_device: torch.device | None = None,
        sync_statistics: StatisticsSync | None = None,
        layout: ShardedLayout | None = None,
        source: SafetensorsCheckpoint | None = None,
        on_block_done: BlockCallback | None = None,
        progress: bool = False,
        reconstruction: Reconstruction | None = None,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.stack = stack
        self.sequential = sequential and stack is not None
        self.forward_fn = forward_fn or default_forward
        self.device = device
        self.offload_device = offload_device
        self.layout = layout
        self.sync_statistics = sync_statistics if sync_statistics is not None else self._layout_sync()
        self.source = source
        self.on_block_done = on_block_done
        self.progress = progress
        # Under FSDP2 every rank must run every block forward to its end: the all-gathers stay in lock-step, and a
        # forward cut short by an exception would leave the block unsharded.
        self.stop_early = layout is None
        self.reconstruction = reconstruction
        self.calibration_seconds = 0.0
        #: Seconds running the blocks as they were on the dense stream (about a dense forward through the stack).
        self.dense_seconds = 0.0
        #: Seconds training blocks to their dense outputs.
        self.reconstruction_seconds = 0.0
        #: What reconstruction did to each changed block, in order.
        self.block_fits: list[BlockFit] = []
        self._done_blocks = 0
        self._applied = False
        self._verb = Action.verb

    def _layout_sync(self) -> StatisticsSync | None:
        layout = self.layout
        if layout is None:
            return None
        return lambda tensors: layout.all_reduce(tensors)  # in-place sums over the weights' process group

    # --- entry points -------------------------------------------------------------------------------------------------

    def run(self, action: Action, batches: list[Any]) -> None:
        """Prepares ``action``, then hands it every layer's statistics: block by block, in one shot, or (for an
        action that needs no data) every layer without statistics."""
        self._verb = action.verb
        with calibration_mode(self.model):
            action.prepare(self, batches)
            if not action.needs_data:
                self._apply(action, self.layers, None)
            elif self.sequential:
                self._run_sequential(action, batches)
            else:
                factories = {layer.name: action.statistics(layer) for layer in self.layers}
                self._apply(action, self.layers, self.collect(self.layers, batches, factories))

    def collect(
        self,
        layers: Sequence[TargetLayer],
        batches: list[Any],
        factories: Mapping[str, Mapping[str, StatisticsFactory]],
        *,
        timed: bool = True,
    ) -> dict[str, dict[str, LayerStatistics]]:
        """One forward pass over ``batches`` with hooks on ``layers``: their statistics, summed across processes and
        checked (every layer reached, every value finite). ``timed`` adds the time to :attr:`calibration_seconds`."""
        start = time.perf_counter()
        collector = StatisticsCollector(layers, factories, stop_when_done=self.stop_early)
        with collector.attached():
            for batch in tqdm(batches, desc="calibrating", disable=not self.progress, leave=False):
                collector.start_batch(token_mask_of(batch), batch_size_of(batch))
                with suppress(StopForward):
                    self._forward(batch)
        if timed:
            self.calibration_seconds += time.perf_counter() - start
        self._finish(collector, self._already_changed())
        return collector.statistics

    def trace(self, batches: list[Any], observe: BlockObserver) -> None:
        """One pass of the unchanged model through the block stack: ``observe(index, inputs, outputs, token_masks)``
        sees every block's input and output hidden states on every batch (on the offload device), in block order.
        Nothing is changed; the time counts as calibration.

        Raises:
            ValueError: Without a block stack, or when the forward never reaches its first block.
        """
        if self.stack is None:
            raise ValueError("tracing hidden states block by block needs a block stack; name it with `blocks`")
        start = time.perf_counter()
        with calibration_mode(self.model):
            records, _ = self._capture(batches, [], {})
            masks = [record.token_mask for record in records]
            for index, block in enumerate(tqdm(self.stack.blocks, desc="tracing blocks", disable=not self.progress)):
                with self._placed(index, block, [], records) as compute:
                    outputs = [move_to(_run_block(block, record, compute), self.offload_device) for record in records]
                observe(index, [record.hidden for record in records], outputs, masks)
                for record, output in zip(records, outputs, strict=True):
                    record.hidden = output
        self.calibration_seconds += time.perf_counter() - start

    # --- the passes ---------------------------------------------------------------------------------------------------

    def _apply(
        self, action: Action, layers: list[TargetLayer], statistics: dict[str, dict[str, LayerStatistics]] | None
    ) -> None:
        self._apply_step(action, Step(layers, statistics, self.stack, layout=self.layout))

    def _apply_step(self, action: Action, step: Step) -> None:
        if self.layout is not None:
            reshard_fsdp_modules(self.model)  # changes go to the sharded parameters, not to unsharded copies
        action.apply(step)
        self._applied = True
        # Under a caller's torch.autocast with its weight cache on, cached low-precision copies of the weights just
        # changed would keep feeding later passes with the old values.
        torch.clear_autocast_cache()

    def _forward(self, batch: Any) -> None:
        self.forward_fn(self.model, move_to(batch, input_device(self.model)))

    def _finish(self, collector: StatisticsCollector, where: str) -> None:
        if self.sync_statistics is not None:
            self.sync_statistics(collector.tensors())
        unreached = [name for name, group in collector.statistics.items() if group and collector.num_tokens(name) == 0]
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

    def _already_changed(self) -> str:
        if not self._applied:
            return ""
        return f" (blocks 0-{self._done_blocks - 1} were already {self._verb}; no later weight was changed)"

    def _capture(
        self,
        batches: list[Any],
        before: Sequence[TargetLayer],
        factories: Mapping[str, Mapping[str, StatisticsFactory]],
    ) -> tuple[list[_BlockInput], StatisticsCollector | None]:
        """Runs the model up to the first block on every batch, recording its inputs; layers before the stack see
        their (unchanged) inputs on the way."""
        assert self.stack is not None
        first = self.stack.blocks[0]

        def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _BlockInputsCaptured(args, kwargs)

        collector = StatisticsCollector(before, factories, stop_when_done=False) if before else None
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
                        f"the calibration forward never reached the first block `{self.stack.block_name(0)}`; pass "
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

    def _run_sequential(self, action: Action, batches: list[Any]) -> None:
        stack = self.stack
        assert stack is not None
        factories = {layer.name: action.statistics(layer) for layer in self.layers}
        by_block: dict[int, list[TargetLayer]] = {}
        outside: list[TargetLayer] = []
        for layer in self.layers:
            index = stack.index_of(layer.name)
            if index is None:
                outside.append(layer)
            else:
                by_block.setdefault(index, []).append(layer)

        # Layers outside the stack that run before it see their (unchanged) inputs during the capture pass.
        start = time.perf_counter()
        records, before = self._capture(batches, outside, factories)
        self.calibration_seconds += time.perf_counter() - start
        after = list(outside)
        if before is not None:
            reached = {name for name in before.statistics if before.num_tokens(name) > 0}
            early = [layer for layer in outside if layer.name in reached]
            after = [layer for layer in outside if layer.name not in reached]
            before.keep_only(early)
            self._finish(before, "")
            if early:
                self._apply(action, early, before.statistics)

        last = len(stack.blocks) - 1
        dense = [record.hidden for record in records] if self.reconstruction is not None else None
        for index, block in enumerate(tqdm(stack.blocks, desc="calibrating blocks", disable=not self.progress)):
            layers = by_block.get(index, [])
            with self._placed(index, block, layers, records) as compute:
                # The dense block's outputs on the dense stream, taken before the action changes the block.
                targets = self._dense_outputs(block, records, dense, compute) if dense is not None else None
                if layers:
                    statistics = self._block_statistics(block, index, layers, records, compute, factories)
                    step = Step(layers, statistics, stack, block=block, block_index=index, layout=self.layout)
                    self._apply_step(action, step)
                    if targets is not None:
                        self._reconstruct(action, step, block, records, targets, compute)
                if targets is not None:
                    dense = targets
                if index < last:
                    start = time.perf_counter()
                    for record in records:
                        record.hidden = move_to(_run_block(block, record, compute), self.offload_device)
                    self.calibration_seconds += time.perf_counter() - start
            self._done_blocks = index + 1
            if self.on_block_done is not None:
                self.on_block_done(stack.block_name(index), block)
        del records

        if after:
            # Layers after the stack (say an explicitly targeted head) are calibrated on the changed model.
            self._apply(action, after, self.collect(after, batches, factories))

    @contextmanager
    def _placed(
        self, index: int, block: nn.Module, layers: list[TargetLayer], records: list[_BlockInput]
    ) -> Iterator[torch.device]:
        """Block ``index`` ready to run (read from the checkpoint if on the meta device, moved to the compute device)
        for the ``with`` block, which gets the compute device; put back after."""
        assert self.stack is not None
        streamed = self.source is not None and bool(meta_tensor_names(block))
        if streamed:
            assert self.source is not None
            home = self.device or input_device(self.model)
            self.source.materialize(block, f"{self.stack.block_name(index)}.", home)
            check_finite(layers, f" (read from the checkpoint for block {index}){self._already_changed()}")
        else:
            home = module_device(block)
        compute = self.device or home or records[0].hidden.device
        if self.device is not None and home is not None and home != self.device:
            block.to(self.device)
        try:
            yield compute
        finally:
            if streamed and self.offload_device is not None:
                block.to(self.offload_device)
            elif not streamed and self.device is not None and home is not None and home != self.device:
                block.to(home)

    def _dense_outputs(
        self, block: nn.Module, records: list[_BlockInput], dense: list[Tensor], compute: torch.device
    ) -> list[Tensor]:
        start = time.perf_counter()
        outputs = [
            move_to(_run_block(block, record, compute, hidden), self.offload_device)
            for record, hidden in zip(records, dense, strict=True)
        ]
        self.dense_seconds += time.perf_counter() - start
        return outputs

    def _reconstruct(
        self,
        action: Action,
        step: Step,
        block: nn.Module,
        records: list[_BlockInput],
        targets: list[Tensor],
        compute: torch.device,
    ) -> None:
        assert self.reconstruction is not None
        pairs = action.reconstructed(step)
        if not pairs:
            return
        start = time.perf_counter()

        def run(module: nn.Module, i: int, cast: Callable[[Any], Any]) -> Tensor:
            return _run_block(module, records[i], compute, cast=cast)

        fit = reconstruct_block(
            block,
            run,
            [target.to(compute) for target in targets],
            [record.token_mask for record in records],
            [p for p, _ in pairs],
            [held for _, held in pairs],
            self.reconstruction,
            self.sync_statistics,
        )
        self.block_fits.append(fit)
        self.reconstruction_seconds += time.perf_counter() - start
        torch.clear_autocast_cache()

    def _block_statistics(
        self,
        block: nn.Module,
        index: int,
        layers: list[TargetLayer],
        records: list[_BlockInput],
        compute: torch.device,
        factories: Mapping[str, Mapping[str, StatisticsFactory]],
    ) -> dict[str, dict[str, LayerStatistics]]:
        start = time.perf_counter()
        collector = StatisticsCollector(layers, factories, stop_when_done=self.stop_early)
        with collector.attached():
            for record in records:
                collector.start_batch(record.token_mask, record.num_sequences)
                with suppress(StopForward):
                    _run_block(block, record, compute)
        self.calibration_seconds += time.perf_counter() - start
        self._finish(collector, f" in block {index}" + self._already_changed())
        return collector.statistics
