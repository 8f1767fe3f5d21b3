"""What a width-pruning run did: per layer widths before and after, the model's size and cost, timings."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, cast

from torch import Tensor, nn

from ..core.calibration_record import CalibrationRecord
from ..core.layers import is_linear_layer
from ..core.tables import format_pairs, format_table

__all__ = ["GroupReport", "ShrinkReport", "describe_kept", "describe_shape", "linear_macs_per_token", "parameter_count"]


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, tied ones once.

    Example::

        >>> parameter_count(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in model.parameters())


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of every Linear and Conv1D layer (``in x out`` each, the LM head included);
    attention's score and value products, which grow with the context, are not counted.

    Example::

        >>> linear_macs_per_token(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
        48
    """
    return sum(cast(Tensor, m.weight).numel() for m in model.modules() if is_linear_layer(m))


@dataclass
class GroupReport:
    """One group's widths.

    Attributes:
        name: The consumer layer (``model.layers.3.mlp.down_proj``).
        kind: ``"mlp"`` or ``"attention"``.
        block: Index of the block holding it, or ``None``.
        units_before: Hidden units, heads or key/value groups before.
        units_after: ... after.
        width_before: The consumer's input channels before.
        width_after: ... after.
        update: What happened to the consumer's kept weights: ``"none"``, ``"bias"`` (the removed units' mean
            contribution went into its bias), ``"least-squares"`` (kept columns and bias refitted) or
            ``"least-squares (weights)"`` (kept columns refitted; no bias the config could hold).
        head_dim: Channels per head (attention), else ``None``.
        kept_units: The units kept, as indices into the units before.
    """

    name: str
    kind: str
    block: int | None
    units_before: int
    units_after: int
    width_before: int
    width_after: int
    update: str = "none"
    head_dim: int | None = None
    kept_units: list[int] = field(default_factory=list)


@dataclass
class ShrinkReport(CalibrationRecord):
    """The result of :func:`~wanda_lightning.shrink`.

    Attributes:
        method: Width method (with options).
        mlp: Fraction of MLP hidden units asked to be removed.
        heads: Fraction of attention heads (or key/value groups) asked to be removed.
        groups: Per layer widths, in model order.
        parameters_before: Model parameters before.
        parameters_after: ... after.
        macs_before: Linear multiply-accumulates per token before (:func:`linear_macs_per_token`).
        macs_after: ... after.
        config_updates: Config attributes rewritten (``intermediate_size``, ``num_attention_heads``,
            ``num_hidden_layers``, ``layer_types``, ...).
        layers: Fraction of the blocks asked to be removed.
        layer_score: How blocks were scored (``"influence"`` or ``"angular"``), or ``None`` without depth pruning.
        blocks_before: Blocks in the stack before (0 without depth pruning).
        removed_blocks: Indices of the removed blocks in the original stack.
        block_scores: Every block's score (``"influence"``) or every run start's (``"angular"``); lower goes first.
        removed_from: Name of the block stack the blocks were removed from, or ``None``.
        speed_target: With ``speedup``: ``{"speedup", "on", "device"}`` (and ``runtime``, ``dtype`` where it was timed
            outside PyTorch), else ``None``.
        candidates: With ``speedup``: every shape timed (``layers``, ``mlp``, ``heads``, ``parameters``,
            ``decode_speedup``, ``prefill_speedup``, ``meets``, ``quality``: the calibration loss where estimated,
            ``chosen``, ``config``: the config entries of the shape timed), in the order timed.
        multiple_of: Per unit kind (``"mlp"``, ``"attention"``), the multiple its kept width was rounded to (1: the
            width asked); empty without width pruning.
        sequential: Whether calibration was block-sequential.
        block_stack: Name of the block stack walked, or ``None``.
        num_samples: Calibration sequences used.
        num_batches: Calibration batches used.
        calibration_seconds: Wall time of forward passes.
        scoring_seconds: Wall time of scoring, selection and surgery.
        total_seconds: Wall time of the whole call.

    Example::

        >>> report = ShrinkReport(method="wanda-sp", mlp=0.5, heads=0.0, parameters_before=10, parameters_after=6)
        >>> report.parameter_ratio
        0.6
    """

    method: str
    mlp: float
    heads: float
    groups: list[GroupReport] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    config_updates: dict[str, Any] = field(default_factory=dict)
    layers: float = 0.0
    layer_score: str | None = None
    blocks_before: int = 0
    removed_blocks: list[int] = field(default_factory=list)
    block_scores: list[float] = field(default_factory=list)
    removed_from: str | None = None
    speed_target: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    multiple_of: dict[str, int] = field(default_factory=dict)

    @property
    def blocks_after(self) -> int:
        """Blocks left in the stack (``blocks_before`` without depth pruning)."""
        return self.blocks_before - len(self.removed_blocks)

    @property
    def parameter_ratio(self) -> float:
        """Parameters after over before."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    @property
    def macs_ratio(self) -> float:
        """Linear MACs per token after over before."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def units(self, kind: str) -> tuple[int, int] | None:
        """``(before, after)`` units per layer of a kind (the first layer's: widths are uniform), or ``None``."""
        found = next((g for g in self.groups if g.kind == kind), None)
        return (found.units_before, found.units_after) if found is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary, ratios included."""
        return {**asdict(self), "parameter_ratio": self.parameter_ratio, "macs_ratio": self.macs_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShrinkReport:
        """Inverse of :meth:`to_dict`.

        Example::

            >>> groups = [GroupReport("d", "mlp", 0, 8, 4, 8, 4)]
            >>> report = ShrinkReport(method="flap", mlp=0.5, heads=0.0, groups=groups)
            >>> ShrinkReport.from_dict(report.to_dict()) == report
            True
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["groups"] = [GroupReport(**group) for group in data.get("groups", [])]
        return cls(**values)

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = [("method", self.method)]
        chosen = next((c for c in self.candidates if c.get("chosen")), None)
        if self.speed_target is not None and chosen is not None:
            on = self.speed_target["on"]
            scored = sum(c.get("quality") is not None for c in self.candidates)
            again = sum(c.get("runs", 1) > 1 for c in self.candidates)
            lines.append(
                (
                    "speed target",
                    f"{self.speed_target['speedup']:g}x {on} on {self.speed_target['device']}: chose "
                    f"{describe_shape(chosen)}, measured {chosen[f'{on}_speedup']:.2f}x{self._sureness(chosen)}; "
                    f"{len(self.candidates)} candidates timed ({again} again in turns), {scored} scored (see "
                    "candidates_table())",
                )
            )
        if self.removed_blocks:
            removed = ", ".join(str(i) for i in self.removed_blocks)
            lines.append(
                (
                    "blocks",
                    f"{self.blocks_before} -> {self.blocks_after} (removed {removed}; layers={self.layers:g}, "
                    f"{self.layer_score} score)",
                )
            )
        mlp = self.units("mlp")
        if mlp is not None:
            lines.append(
                ("MLP hidden units per layer", f"{mlp[0]} -> {mlp[1]} (mlp={self.mlp:g}{self._rounded('mlp')})")
            )
        attention = next((g for g in self.groups if g.kind == "attention"), None)
        if attention is not None and attention.head_dim:
            heads = (attention.width_before // attention.head_dim, attention.width_after // attention.head_dim)
            lines.append(
                (
                    "attention heads per layer",
                    f"{heads[0]} -> {heads[1]} query heads, {attention.units_before} -> {attention.units_after} "
                    f"key/value heads, width {attention.width_before} -> {attention.width_after} "
                    f"(heads={self.heads:g}{self._rounded('attention')})",
                )
            )
        lines += [
            ("layers changed", f"{len(self.groups)}"),
            (
                "parameters",
                f"{self.parameters_before:,} -> {self.parameters_after:,} ({self.parameter_ratio:.3f}x)",
            ),
            ("linear MACs per token", f"{self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}x)"),
            ("config", ", ".join(f"{k}={v}" for k, v in self.config_updates.items()) or "(no config)"),
            ("calibration", f"{self.num_samples} sequences, {self.num_batches} batches"),
            ("mode", f"block-sequential over `{self.block_stack}`" if self.sequential else "one-shot"),
            *self.reconstruction_lines(),
            (
                "time",
                f"{self.total_seconds:.2f} s (calibration {self.calibration_seconds:.2f} s, scoring and surgery "
                f"{self.scoring_seconds:.2f} s)",
            ),
        ]
        return lines

    def _sureness(self, chosen: dict[str, Any]) -> str:
        """`` (turns 1.49-1.58x, 93 % sure)``: how the chosen shape's turns spread and how sure they make it."""
        paired = chosen.get("paired_speedups") or []
        if not paired:
            return ""
        text = f" (median of {len(paired)} turns, {min(paired):.2f}-{max(paired):.2f}x"
        confidence = chosen.get("confidence")
        return f"{text}, {confidence:.0%} sure it reaches the target)" if confidence is not None else f"{text})"

    def _rounded(self, kind: str) -> str:
        multiple = self.multiple_of.get(kind, 1)
        return f", width a multiple of {multiple}" if multiple > 1 else ""

    def table(self) -> str:
        """The per-layer table: widths before and after."""
        rows = [
            (g.name, g.kind, f"{g.units_before} -> {g.units_after}", f"{g.width_before} -> {g.width_after}")
            for g in self.groups
        ]
        return "\n".join(format_table(("layer", "kind", "units", "width"), rows))

    def candidates_table(self) -> str:
        """The speed target's candidates: shape, what it keeps, parameters, measured speed-ups (the median of the
        paired turns where timed again), the cost model's speed-up, how many times the shape was timed, whether it
        meets the target and how sure its turns make that, quality estimate, chosen."""
        rows = [
            (
                describe_shape(c),
                describe_kept(c.get("config", {})),
                f"{c['parameters'] / 1e6:.1f}M",
                f"{c['decode_speedup']:.2f}x",
                f"{c['prefill_speedup']:.2f}x",
                f"{c['fitted_speedup']:.2f}x" if c.get("fitted_speedup") is not None else "-",
                str(c.get("runs", 1)),
                "yes" if c["meets"] else "no",
                f"{c['confidence']:.0%}" if c.get("confidence") is not None else "-",
                f"{c['quality']:.4f}" if c.get("quality") is not None else "-",
                "<-" if c.get("chosen") else "",
            )
            for c in self.candidates
        ]
        header = ["shape", "kept", "params", "decode", "prefill", "fit", "runs", "meets", "sure", "calibration loss"]
        header.append("chosen")
        return "\n".join(format_table(header, rows))

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Writes a PNG of the speed target's candidates: every shape timed (parameters against measured speed-up,
        those that reach the target in colour) and the scored ones (calibration loss against measured speed-up), the
        target as a dashed line, the chosen one starred. Needs matplotlib
        (``pip install "wanda-lightning[plot]"``).

        Raises:
            ValueError: Without candidates (``shrink`` was not given ``speedup``).
            ImportError: Without matplotlib.
        """
        if not self.candidates or self.speed_target is None:
            raise ValueError("no speed-target candidates to plot: shrink(..., speedup=...) makes them")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - the extra is installed in tests
            raise ImportError('report.plot() needs matplotlib: pip install "wanda-lightning[plot]"') from error
        on = self.speed_target["on"]
        figure, (sizes, losses) = plt.subplots(1, 2, figsize=(11, 4.5))
        scored = [c for c in self.candidates if c.get("quality") is not None]
        for meets, colour in ((False, "lightgrey"), (True, "tab:blue")):
            group = [c for c in self.candidates if bool(c["meets"]) is meets]
            sizes.scatter([c[f"{on}_speedup"] for c in group], [c["parameters"] / 1e6 for c in group], color=colour,
                          label="reaches the target" if meets else "does not")  # fmt: skip
        losses.scatter([c[f"{on}_speedup"] for c in scored], [c["quality"] for c in scored], color="tab:blue")
        chosen = next(c for c in self.candidates if c.get("chosen"))
        labelled = [(sizes, chosen, chosen["parameters"] / 1e6)] + [(losses, c, c["quality"]) for c in scored]
        for axes, candidate, value in labelled:
            point = (candidate[f"{on}_speedup"], value)
            axes.annotate(describe_shape(candidate), point, fontsize=7, xytext=(4, 4), textcoords="offset points")
            if candidate is chosen:
                axes.scatter(*point, marker="*", s=220, color="tab:red", label="chosen")
        for axes in (sizes, losses):
            axes.axvline(self.speed_target["speedup"], linestyle="--", color="grey")
            axes.set_xlabel(f"measured {on} speed-up over dense ({self.speed_target['device']})")
        sizes.set_ylabel("parameters (M)")
        sizes.set_title("every candidate timed")
        sizes.legend(fontsize=8)
        losses.set_ylabel("calibration loss, one-shot (lower is better)")
        losses.set_title(f"scored candidates (target {self.speed_target['speedup']:g}x, dashed)")
        figure.tight_layout()
        figure.savefig(os.fspath(path), dpi=120)
        plt.close(figure)

    def __str__(self) -> str:
        return "\n".join(format_pairs(self._summary_lines()))


def describe_kept(config: dict[str, Any]) -> str:
    """``"24 blocks, MLP 448"``: what a speed-target candidate's config keeps (``-`` for the dense config).

    Example::

        >>> describe_kept({"num_hidden_layers": 24, "intermediate_size": 448, "num_attention_heads": 6})
        '24 blocks, MLP 448, 6 heads'
    """
    names = (("num_hidden_layers", "{} blocks"), ("intermediate_size", "MLP {}"), ("num_attention_heads", "{} heads"))
    return ", ".join(text.format(config[key]) for key, text in names if key in config) or "-"


def describe_shape(candidate: dict[str, Any]) -> str:
    """``"layers=0.2 mlp=0.25"``: a speed-target candidate's fractions that are not 0.

    Example::

        >>> describe_shape({"layers": 0.2, "mlp": 0.0, "heads": 0.0})
        'layers=0.2'
    """
    values = (("layers", candidate["layers"]), ("mlp", candidate["mlp"]), ("heads", candidate["heads"]))
    return " ".join(f"{name}={value:.3g}" for name, value in values if value) or "dense"
