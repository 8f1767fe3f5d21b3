"""Score and mask: the pipeline action behind ``prune()``, for every method, allocation and refinement."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..core.collector import StatisticsFactory
from ..core.pipeline import Action, CalibrationPipeline, Step
from ..core.statistics import InputNormStatistics, LayerStatistics
from ..core.target_layer import TargetLayer
from ..distributed.sharding import with_full_weights
from ..methods.base import PruningWarning
from ..methods.channels import find_channel_couplings
from ..methods.wanda import Wanda
from .config import PruneConfig
from .report import LayerReport, PruningReport

__all__ = ["LayerCallback", "MaskAction", "check_keeps_pruned", "warn_once_per_kind"]

LayerCallback = Callable[[str, Tensor], None]
"""Called as ``callback(layer_name, keep_mask)`` after each layer is pruned."""


def check_keeps_pruned(config: PruneConfig) -> None:
    """Raises unless ``config`` can re-prune a partly pruned model keeping what was pruned (``already_pruned``): the
    method must score and select (not rewrite kept weights or select by cumulative scores), without a refinement that
    swaps pruned and kept weights or rewrites kept ones, or a channel permutation. Read from what the method and the
    refinement declare: :attr:`~wanda_lightning.methods.base.PruningMethod.rewrites_weights`,
    :attr:`~wanda_lightning.methods.base.PruningMethod.cumulative_selection`,
    :attr:`~wanda_lightning.methods.base.Refinement.changes_mask` and
    :attr:`~wanda_lightning.methods.base.Refinement.rewrites_weights`.

    Raises:
        ValueError: Naming the argument that stands in the way.

    Example::

        >>> check_keeps_pruned(PruneConfig.create(method="wanda"))
        >>> check_keeps_pruned(PruneConfig.create(method="sparsegpt"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `method`='sparsegpt' rewrites the kept weights while it selects, ...
    """
    method, refinement = config.method, config.refinement
    if method.rewrites_weights or method.permute_channels:
        raise ValueError(
            f"`method`={method.describe()!r} rewrites the kept weights while it selects, so it cannot re-prune a "
            "partly pruned model keeping what was pruned; use 'wanda', 'magnitude' or 'ria'"
        )
    if method.cumulative_selection:
        raise ValueError(
            "`variant`=True selects by cumulative scores, which weights pruned before would distort; use the plain "
            "per-row selection (variant=False)"
        )
    if refinement is not None and refinement.changes_mask:
        raise ValueError(
            f"`refine`={refinement.describe()!r} swaps pruned and kept weights, which would bring back weights "
            "pruned before; leave `refine` out"
        )
    if refinement is not None and refinement.rewrites_weights:
        raise ValueError(
            f"`refine`={refinement.describe()!r} rewrites the kept weights, so it cannot re-prune a partly pruned "
            "model keeping what was pruned; leave `refine` out"
        )


class MaskAction(Action):
    """Scores each layer with the configured method, selects and applies its keep mask (after an optional channel
    permutation, with an optional refinement), and records the result in ``report``.

    With an allocation (OWL), :meth:`prepare` first runs a dense calibration pass of its own to give each block its
    sparsity.

    Args:
        config: The pruning configuration.
        model: The model (for channel couplings).
        layers: The target layers.
        report: Filled as layers are pruned.
        on_layer_pruned: Called as ``on_layer_pruned(name, keep_mask)`` after each layer.
        already_pruned: ``(out_features, in_features)`` masks, True where a weight was pruned before, by layer name:
            those weights score below every other and stay pruned whatever the new scores (a gradual schedule
            re-scores a partly pruned model). Needs a method that scores and selects (see :func:`check_keeps_pruned`).
    """

    verb = "pruned"

    def __init__(
        self,
        config: PruneConfig,
        model: nn.Module,
        layers: Sequence[TargetLayer],
        report: PruningReport,
        on_layer_pruned: LayerCallback | None = None,
        already_pruned: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.config = config
        self.already_pruned = dict(already_pruned or {})
        self.model = model
        self.layers = list(layers)
        self.report = report
        self.on_layer_pruned = on_layer_pruned
        self.layer_sparsity: dict[str, float] = {}
        self._factories: dict[str, StatisticsFactory] = {"method": config.method.new_statistics}
        if config.refinement is not None:
            self._factories["refine"] = config.refinement.new_statistics

    @property
    def needs_data(self) -> bool:
        config = self.config
        return config.method.requires_calibration or config.refinement is not None or config.reconstruction is not None

    def statistics(self, layer: TargetLayer) -> Mapping[str, StatisticsFactory]:
        return self._factories

    def reconstructed(self, step: Step) -> list[tuple[nn.Parameter, Tensor | None]]:
        """The step's layers: their weights with the pruned ones held at zero, and their biases."""
        return [
            (p, p == 0 if name == "weight" else None)
            for layer in step.layers
            for name, p in layer.module.named_parameters(recurse=False)
        ]

    # --- allocation -------------------------------------------------------------------------------------------------

    def prepare(self, pipeline: CalibrationPipeline, batches: list[Any]) -> None:
        """OWL: per-block sparsities from the outlier share of Wanda scores in one dense calibration pass."""
        allocation = self.config.allocation
        if allocation is None:
            return
        start = time.perf_counter()
        statistics = pipeline.collect(
            self.layers, batches, {layer.name: {"owl": InputNormStatistics} for layer in self.layers}, timed=False
        )
        stack = pipeline.stack
        groups: dict[str, list[TargetLayer]] = {}
        for layer in self.layers:
            index = stack.index_of(layer.name) if stack is not None else None
            if stack is not None and index is None:
                continue  # layers outside the block stack keep the target sparsity
            key = stack.block_name(index) if stack is not None and index is not None else layer.name
            groups.setdefault(key, []).append(layer)
        layout = pipeline.layout
        reduce = (lambda tensor: layout.all_reduce([tensor])) if layout is not None else None  # sharded: whole weights
        scorer = Wanda()

        def scores() -> Iterator[list[Tensor]]:  # one block's scores alive at a time
            for layers in groups.values():
                yield [
                    scorer.score(layer.weight_2d, statistics[layer.name]["owl"])
                    for layer in with_full_weights(layers, layout)
                ]

        sparsities, ratios = allocation.allocate(scores(), self.config.structure.sparsity, reduce)
        for (key, layers), sparsity, ratio in zip(groups.items(), sparsities, ratios, strict=True):
            self.report.block_sparsity[key] = sparsity
            self.report.outlier_ratios[key] = ratio
            for layer in layers:
                self.layer_sparsity[layer.name] = sparsity
        self.report.allocation_seconds += time.perf_counter() - start

    # --- pruning ----------------------------------------------------------------------------------------------------

    def apply(self, step: Step) -> None:
        config = self.config
        if config.method.permute_channels and config.structure.is_n_m and step.statistics is not None:
            self._permute_channels(step.layers, step.statistics)
        try:
            for layer in step.writable():
                self._prune_layer(layer, step.take(layer.name), step.block_of(layer))
        finally:
            config.method.clear_cache()
            if config.refinement is not None:
                config.refinement.clear_cache()

    def _prune_layer(self, layer: TargetLayer, group: dict[str, LayerStatistics], block: int | None) -> None:
        config = self.config
        start = time.perf_counter()
        weight = layer.weight_2d
        sparsity = self.layer_sparsity.get(layer.name, config.structure.sparsity)
        dense = weight.float().clone() if config.refinement is not None else None
        already = self.already_pruned.get(layer.name)
        try:
            with _collected_warnings(layer.name, self.report.warnings):
                if already is None:
                    keep = config.method.prune_layer(weight, group.get("method"), config.structure, sparsity)
                else:
                    keep = self._prune_again(weight, group.get("method"), sparsity, already)
        except FloatingPointError as error:
            raise FloatingPointError(f"layer {layer.name!r}: {error}") from None
        except torch.linalg.LinAlgError as error:
            raise ValueError(f"layer {layer.name!r}: {error}; exclude it with `ignore`") from None
        self.report.scoring_seconds += time.perf_counter() - start
        if config.refinement is not None and dense is not None:
            start = time.perf_counter()
            with _collected_warnings(layer.name, self.report.warnings):
                keep = config.refinement.refine(dense, weight, keep, group.get("refine"), config.structure)
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
                block=block,
            )
        )

    def _prune_again(
        self, weight: Tensor, statistics: LayerStatistics | None, sparsity: float, already: Tensor
    ) -> Tensor:
        """Scores and selects like :meth:`PruningMethod.prune_layer`, with the weights pruned before scored below every
        other and kept pruned."""
        method, structure = self.config.method, self.config.structure
        already = already.to(device=weight.device, dtype=torch.bool)
        if tuple(already.shape) != tuple(weight.shape):
            raise ValueError(
                f"the mask of weights pruned before has shape {tuple(already.shape)}, not {tuple(weight.shape)}"
            )
        scores = method.score(weight, statistics)
        if not bool(torch.isfinite(scores).all()):
            raise FloatingPointError("scores contain NaN or Inf (the weight itself is not finite)")
        keep = method.select(scores.masked_fill(already, -torch.inf), structure, sparsity) & ~already
        weight.masked_fill_(~keep, 0)
        return keep

    def _permute_channels(
        self, layers: Sequence[TargetLayer], statistics: dict[str, dict[str, LayerStatistics]]
    ) -> None:
        """Reorders the input channels of the layers whose producers are among the model's modules (see
        :mod:`~wanda_lightning.methods.channels`), before any of ``layers`` is pruned: the producers' masks then
        follow."""
        start = time.perf_counter()
        couplings = find_channel_couplings(self.model, [layer.name for layer in layers])
        for layer in layers:
            coupling, group = couplings.get(layer.name), statistics.get(layer.name)
            if coupling is None or not group:
                continue
            index = self.config.method.channel_order(layer.weight_2d, group.get("method"), self.config.structure)
            if index is None:
                continue
            coupling.permute(layer.weight_2d, index)
            for stats in group.values():
                stats.permute_inputs(index)
            self.report.permuted_layers.append(layer.name)
        self.report.scoring_seconds += time.perf_counter() - start


@contextmanager
def _collected_warnings(name: str, collected: list[str]) -> Iterator[None]:
    """Collects the :class:`~wanda_lightning.methods.base.PruningWarning` raised in the ``with`` block into
    ``collected``, with the layer's name in front (methods do not know it), for :func:`warn_once_per_kind` to report at
    the end of the run; other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PruningWarning)  # one per layer, not one per line of code
        yield
    for record in caught:
        if issubclass(record.category, PruningWarning):
            collected.append(f"layer {name!r}: {record.message}")
        else:
            warnings.warn_explicit(
                record.message, record.category, record.filename, record.lineno, source=record.source
            )


#: A number in a warning: what varies between layers' messages of the same kind.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?")


def warn_once_per_kind(messages: Sequence[str], stacklevel: int = 2) -> None:
    """Issues one :class:`~wanda_lightning.methods.base.PruningWarning` per kind of message (the same text but for
    the layer's name and the numbers): the message itself when one layer raised it, else how many layers did, which
    (the first and the last), the text with each number as its range over those layers, and where each layer's
    message is (the report's ``warnings``).

    Args:
        messages: ``"layer '<name>': <text>"`` per layer and warning, as the report's ``warnings`` hold them.
        stacklevel: Where the warnings point, as for :func:`warnings.warn` (the caller of this function: 2).

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_once_per_kind([f"layer '{name}': ADMM: {weak} of 8 features weak" for name, weak in
        ...                         (("a", 3), ("b", 1), ("c", 2))])
        >>> len(caught), str(caught[0].message).split(" (each")[0]
        (1, "3 layers (layer 'a', ..., layer 'c'): ADMM: 1-3 of 8 features weak")
    """
    kinds: dict[str, list[str]] = {}
    for message in messages:
        kinds.setdefault(_NUMBER.sub("N", message.split(": ", 1)[-1]), []).append(message)
    for found in kinds.values():
        if len(found) == 1:
            warnings.warn(found[0], PruningWarning, stacklevel=stacklevel + 1)
            continue
        names = [message.split(": ", 1)[0] for message in found if message.startswith("layer ")]
        where = f" ({', '.join(names) if len(names) <= 2 else f'{names[0]}, ..., {names[-1]}'})" if names else ""
        warnings.warn(
            f"{len(found)} layers{where}: {_with_ranges([message.split(': ', 1)[-1] for message in found])} (each "
            "layer's message is in the report's `warnings`)",
            PruningWarning,
            stacklevel=stacklevel + 1,
        )


def _with_ranges(texts: Sequence[str]) -> str:
    """Texts that differ only in their numbers, as one: each number is the range it takes over them (``"3-17"``), or
    itself where it is the same in all.

    Example::

        >>> _with_ranges(["3 of 576 below 0.001", "17 of 576 below 0.001", "5 of 576 below 0.001"])
        '3-17 of 576 below 0.001'
    """
    pieces = _NUMBER.split(texts[0])  # the text around the numbers, the same in every one
    columns = zip(*(_NUMBER.findall(text) for text in texts), strict=True)  # each number over the texts
    ranges: list[str] = []
    for values in columns:
        low, high = min(values, key=float), max(values, key=float)
        if float(low) == float(high):
            ranges.append(low)
        else:
            ranges.append(f"{low} to {high}" if "e" in low + high else f"{low}-{high}")
    return "".join(piece + number for piece, number in zip(pieces, [*ranges, ""], strict=True))
