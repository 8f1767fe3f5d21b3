"""Forward pre-hooks that feed each layer's input to its statistics during a calibration forward."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .attention import split_attention
from .statistics import LayerStatistics, flatten_tokens
from .target_layer import TargetLayer

__all__ = ["StatisticsCollector", "StatisticsFactory", "StopForward"]

StatisticsFactory = Callable[[int, torch.device], LayerStatistics | None]
"""Makes a fresh accumulator for a layer with ``in_features`` inputs on a device (``None``: nothing to collect)."""


class StopForward(Exception):
    """Raised by a hook once every layer of interest has seen its input, to skip the rest of the forward."""


class StatisticsCollector:
    """Hooks on ``layers`` that accumulate each one's statistics, one object per factory the layer asks for.

    Layers that receive the very same input tensor one after the other share the summary of it (one ``x^T x`` for
    ``q``/``k``/``v``); the cache holds a reference to that one tensor, so its memory cannot be reused by another
    tensor while it is cached.

    Args:
        layers: The layers to watch.
        factories: For each layer name, ``{key: factory}``; a factory returning ``None`` adds nothing.
        stop_when_done: Raise :class:`StopForward` once every layer has seen an input in the current batch.

    Example::

        >>> from wanda_lightning.core.statistics import InputNormStatistics
        >>> from wanda_lightning.core.targets import find_targets
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> layers, _ = find_targets(net)
        >>> collector = StatisticsCollector(layers, {t.name: {"norm": InputNormStatistics} for t in layers}, False)
        >>> with collector.attached():
        ...     collector.start_batch(None, num_sequences=1)
        ...     _ = net(torch.ones(4, 2))
        >>> collector.statistics["0"]["norm"].mean_sq_norm.tolist()
        [4.0, 4.0]
    """

    def __init__(
        self,
        layers: Sequence[TargetLayer],
        factories: Mapping[str, Mapping[str, StatisticsFactory]],
        stop_when_done: bool,
    ) -> None:
        self.layers = list(layers)
        self.statistics: dict[str, dict[str, LayerStatistics]] = {}
        for layer in self.layers:
            made = {
                key: factory(layer.in_features, layer.weight_2d.device)
                for key, factory in factories.get(layer.name, {}).items()
            }
            self.statistics[layer.name] = {key: stats for key, stats in made.items() if stats is not None}
        self.stop_when_done = stop_when_done
        self.token_mask: Tensor | None = None
        self.num_sequences = 0
        self._seen: set[str] = set()
        self._cache: list[tuple[Tensor, int, type, tuple[Tensor, ...]]] = []

    def start_batch(self, token_mask: Tensor | None, num_sequences: int) -> None:
        """Sets the token mask and sequence count of the batch about to run."""
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

    def _hook(self, layer: TargetLayer) -> Callable[..., None]:
        name = layer.name

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = layer.input_of(args, kwargs).detach()
            version = inputs._version
            for stats in self.statistics[name].values():
                stats.accumulate(self._summary(stats, inputs, version), self.num_sequences)
            self._seen.add(name)
            if self.stop_when_done and len(self._seen) == len(self.layers):
                raise StopForward

        return hook

    @contextmanager
    def attached(self) -> Iterator[StatisticsCollector]:
        """Registers the hooks for the duration of the ``with`` block (and splits the ``MultiheadAttention`` modules
        whose ``out_proj`` is watched, so that it runs as a module: see :func:`~wanda_lightning.core.attention.
        split_attention`)."""
        handles = [layer.module.register_forward_pre_hook(self._hook(layer), with_kwargs=True) for layer in self.layers]
        try:
            with split_attention(self.layers):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._cache.clear()

    def tensors(self) -> list[Tensor]:
        """All statistic tensors, in a fixed order, for an all-reduce."""
        return [t for group in self.statistics.values() for stats in group.values() for t in stats.state_tensors()]

    def num_tokens(self, name: str) -> int:
        """Most tokens any statistics of layer ``name`` saw."""
        return max((stats.num_tokens for stats in self.statistics[name].values()), default=0)

    def keep_only(self, layers: Sequence[TargetLayer]) -> None:
        """Drops every layer but ``layers`` (and their statistics)."""
        self.layers = list(layers)
        self.statistics = {layer.name: self.statistics[layer.name] for layer in layers}
