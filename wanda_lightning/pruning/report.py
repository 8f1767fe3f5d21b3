"""What a pruning run did: per-layer results, what was skipped, totals and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor

from ..core.calibration_record import CalibrationRecord
from ..core.tables import format_pairs, format_table
from ..core.target_layer import TargetLayer

__all__ = ["LayerReport", "PruneResult", "PruningReport", "SkippedLayer"]


@dataclass
class LayerReport:
    """One pruned layer.

    Attributes:
        name: Module name.
        kind: Module class (``"Linear"`` or ``"Conv1D"``).
        shape: ``(out_features, in_features)``.
        sparsity: Fraction of the layer's weights the mask zeroed.
        target_sparsity: The sparsity asked of this layer.
        num_pruned: Weights zeroed by the mask.
        num_tokens: Calibration tokens that reached the layer (0 for data-free methods).
        block: Index of the block holding the layer, or ``None`` outside the block stack.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    sparsity: float
    target_sparsity: float
    num_pruned: int
    num_tokens: int
    block: int | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class SkippedLayer:
    """A prunable layer that was left alone, and why."""

    name: str
    reason: str


@dataclass
class PruningReport(CalibrationRecord):
    """The result of :func:`~wanda_lightning.prune`.

    Attributes:
        method: Method name (with options).
        structure: ``"unstructured"`` or ``"N:M"``.
        target_sparsity: Sparsity asked for.
        sequential: Whether calibration was block-sequential.
        block_stack: Name of the block stack walked, or ``None`` (one-shot).
        num_samples: Calibration sequences used.
        num_batches: Calibration batches used.
        layers: Per-layer results, in pruning order.
        skipped: Prunable layers left alone, with the reason.
        allocation: Layer-wise allocation (``"owl (...)"``) or ``None`` for uniform sparsity.
        refinement: Mask refinement (``"dsnot"``) or ``None``.
        block_sparsity: Sparsity given to each block by the allocation.
        outlier_ratios: OWL's outlier share of each block.
        permuted_layers: Layers whose input channels an N:M channel permutation reordered (with their producers).
        warnings: What methods and refinements warned about, one message per layer and kind (a numerical fallback,
            input features without calibration signal, ...); ``prune()`` warns once per kind.
        calibration_seconds: Wall time of forward passes (capture, statistics, propagation).
        scoring_seconds: Wall time of scoring, mask selection, weight updates and masking.
        allocation_seconds: Wall time of the allocation (its dense calibration pass included).
        refine_seconds: Wall time of mask refinement.
        total_seconds: Wall time of the whole call.

    Example::

        >>> report = PruningReport(method="wanda", structure="unstructured", target_sparsity=0.5)
        >>> report.global_sparsity
        0.0
    """

    method: str
    structure: str
    target_sparsity: float
    allocation: str | None = None
    refinement: str | None = None
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    block_sparsity: dict[str, float] = field(default_factory=dict)
    outlier_ratios: dict[str, float] = field(default_factory=dict)
    permuted_layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allocation_seconds: float = 0.0
    refine_seconds: float = 0.0

    @property
    def num_parameters(self) -> int:
        """Weights in the pruned layers."""
        return sum(layer.numel for layer in self.layers)

    @property
    def num_pruned(self) -> int:
        """Weights zeroed."""
        return sum(layer.num_pruned for layer in self.layers)

    @property
    def global_sparsity(self) -> float:
        """Fraction of the pruned layers' weights that were zeroed."""
        total = self.num_parameters
        return self.num_pruned / total if total else 0.0

    @property
    def num_tokens(self) -> int:
        """Most calibration tokens any pruned layer saw."""
        return max((layer.num_tokens for layer in self.layers), default=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary, totals included."""
        data = asdict(self)
        data["layers"] = [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers]
        data.update(
            num_parameters=self.num_parameters,
            num_pruned=self.num_pruned,
            global_sparsity=self.global_sparsity,
            num_tokens=self.num_tokens,
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningReport:
        """Inverse of :meth:`to_dict` (derived totals are recomputed, unknown keys ignored).

        Example::

            >>> report = PruningReport(method="wanda", structure="2:4", target_sparsity=0.5)
            >>> PruningReport.from_dict(report.to_dict()) == report
            True
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["layers"] = [
            LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data.get("layers", [])
        ]
        values["skipped"] = [SkippedLayer(**skipped) for skipped in data.get("skipped", [])]
        return cls(**values)

    def _summary_lines(self) -> list[tuple[str, str]]:
        return [
            ("method", self.method),
            ("allocation", self.allocation or "uniform"),
            ("refinement", self.refinement or "none"),
            ("structure", self.structure),
            ("target sparsity", f"{self.target_sparsity:.2%}"),
            ("global sparsity", f"{self.global_sparsity:.2%} ({self.num_pruned:,} of {self.num_parameters:,})"),
            ("layers pruned / skipped", f"{len(self.layers)} / {len(self.skipped)}"),
            ("calibration", f"{self.num_samples} sequences, {self.num_tokens:,} tokens, {self.num_batches} batches"),
            ("mode", f"block-sequential over `{self.block_stack}`" if self.sequential else "one-shot"),
            *([("permuted channels", f"{len(self.permuted_layers)} layers")] if self.permuted_layers else []),
            (
                "time",
                f"{self.total_seconds:.2f} s (calibration {self.calibration_seconds:.2f} s, "
                f"scoring {self.scoring_seconds:.2f} s"
                + (f", allocation {self.allocation_seconds:.2f} s" if self.allocation else "")
                + (f", refinement {self.refine_seconds:.2f} s" if self.refinement else "")
                + ")",
            ),
        ]

    def _layer_rows(self) -> list[list[str]]:
        return [
            [
                layer.name,
                layer.kind,
                f"{layer.shape[0]}x{layer.shape[1]}",
                f"{layer.sparsity:.2%}",
                f"{layer.num_tokens:,}",
            ]
            for layer in self.layers
        ]

    _HEADER = ("layer", "kind", "shape", "sparsity", "tokens")

    def to_markdown(self) -> str:
        """A Markdown summary and per-layer table."""
        lines = ["| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in self._summary_lines()]
        lines += ["", "| " + " | ".join(self._HEADER) + " |", "|" + "---|" * len(self._HEADER)]
        lines += [
            "| " + " | ".join(f"`{row[0]}`" if i == 0 else row[i] for i in range(len(row))) + " |"
            for row in self._layer_rows()
        ]
        if self.skipped:
            lines += ["", "| skipped | reason |", "|---|---|"]
            lines += [f"| `{s.name}` | {s.reason} |" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [*format_pairs(self._summary_lines()), "", *format_table(self._HEADER, self._layer_rows())]
        for skipped in self.skipped:
            lines.append(f"skipped {skipped.name}: {skipped.reason}")
        return "\n".join(lines)


@dataclass
class PruneResult:
    """What :func:`~wanda_lightning.pruning.api.prune_with` made: the report, the layers it pruned and their masks.

    Attributes:
        report: The :class:`PruningReport`.
        layers: The target layers that were pruned (the query, key and value thirds of a ``MultiheadAttention``'s
            ``in_proj_weight`` are three layers of one parameter).
        masks: Keep masks (True where a weight is kept) by parameter name, shaped like the parameter: this process's
            rows of a weight sharded by FSDP2, and read back from the weights' zeros under FSDP1; empty unless asked
            for with ``keep_masks=True``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from wanda_lightning.pruning import PruneConfig, prune_with
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> result = prune_with(net, [torch.randn(3, 4)], PruneConfig.create(), keep_masks=True)
        >>> result.report.global_sparsity, result.masks["0.weight"].sum().item()
        (0.5, 4)
    """

    report: PruningReport
    layers: list[TargetLayer]
    masks: dict[str, Tensor] = field(default_factory=dict)

    def parameters(self) -> dict[str, Tensor]:
        """The pruned weights by parameter name (one entry per parameter)."""
        return {layer.parameter_name: layer.tensor for layer in self.layers}
