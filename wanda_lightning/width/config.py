"""What a width-pruning run does, validated once: :class:`ShrinkConfig`, shared by ``shrink()``, the callback and the
CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from ..core.options import CalibrationOptions, options_or_default
from ..core.reconstruction import Reconstruction
from ..core.validation import units_to_remove
from ..depth.scores import LAYER_SCORES
from .methods import WidthMethod, get_width_method
from .speed_target import SpeedTarget
from .updates import UPDATES

__all__ = [
    "DEFAULT_MULTIPLE",
    "RECONSTRUCT",
    "WIDTHS",
    "ShrinkConfig",
    "Widths",
    "kept_units",
    "resolve_multiple",
    "units_to_remove",
]

#: The ``update`` that refits with least squares, then trains each block to its dense outputs (default settings).
RECONSTRUCT = "reconstruct"

Widths = Literal["uniform", "adaptive"]
WIDTHS: tuple[str, ...] = get_args(Widths)

#: ``multiple_of=None`` rounds each kept width to a multiple of this where the dense width is one: the q8_0, q4_0 and
#: q4_1 blocks of llama.cpp (and GGUF) hold 32 values of a row, and the SIMD kernels work on whole blocks.
DEFAULT_MULTIPLE = 32


def _multiple_of(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            "`multiple_of` must be a positive integer (32 fits the q8_0/q4_0 blocks; 1 keeps widths as asked) or "
            f"None ({DEFAULT_MULTIPLE} where the dense widths are multiples of {DEFAULT_MULTIPLE}), got {value!r}"
        )
    return value


def resolve_multiple(multiple_of: int | None, width: int) -> int:
    """The multiple a layer's kept width is rounded to: ``multiple_of``, or with ``None``, :data:`DEFAULT_MULTIPLE`
    where the dense ``width`` (the consumer's input channels, its row length) is a multiple of it, else 1 (a model
    whose rows a quantized type could not hold before shrinking keeps the widths asked).

    Example::

        >>> resolve_multiple(None, 1536), resolve_multiple(None, 100), resolve_multiple(8, 100)
        (32, 1, 8)
    """
    if multiple_of is not None:
        return multiple_of
    return DEFAULT_MULTIPLE if width % DEFAULT_MULTIPLE == 0 else 1


def kept_units(fraction: float, units: int, per_unit: int, multiple: int, argument: str, where: str) -> int:
    """Units a layer keeps when ``fraction`` of its ``units`` go and its kept width (``units x per_unit`` channels read
    by the consumer) must be a multiple of ``multiple``.

    Units go in steps of ``multiple / gcd(multiple, per_unit)`` (an MLP's hidden units one channel each; a key/value
    group of attention ``per_unit`` = its query heads x ``head_dim`` channels, so with ``head_dim`` 64 any count of
    groups is a multiple of 32). The count removed is ``fraction x units`` rounded to the nearest count that leaves a
    multiple (halves up, as :func:`units_to_remove` rounds), then bounded: at least one step is kept, never more than
    the largest multiple the layer holds. With a step of one unit this is ``units - units_to_remove(...)``.

    Raises:
        ValueError: A fraction :func:`units_to_remove` refuses; a layer narrower than one multiple; a non-zero
            fraction that removes nothing once rounded. Each names the argument, the layer and what is allowed.

    Example::

        >>> kept_units(0.3, 1536, 1, 32, "mlp", "down_proj"), kept_units(0.3, 1536, 1, 1, "mlp", "down_proj")
        (1088, 1075)
        >>> kept_units(0.34, 3, 192, 32, "heads", "o_proj")  # 3 groups of 3 heads x 64: any count is a multiple
        2
    """
    removed = units_to_remove(fraction, units, argument, where)
    step = multiple // math.gcd(multiple, per_unit)
    if step == 1:
        return units - removed
    if units < step:
        raise ValueError(
            f"`multiple_of`={multiple}: {where} has {units} units of {per_unit} channel(s), and a width that is a "
            f"multiple of {multiple} needs {step} units at a time; use a smaller `multiple_of`, or 1"
        )
    base = units % step  # removed counts that leave a multiple: base, base + step, ...
    steps = max(math.floor((fraction * units - base) / step + 0.5), 0)
    kept = max(units - base - steps * step, step)
    if kept == units:
        raise ValueError(
            f"`{argument}`={fraction:g} of {units} units in {where} removes none once the kept width is rounded to a "
            f"multiple of {multiple} (`multiple_of`); use at least {step / (2 * units):g} ({step} units), or "
            "`multiple_of`=1"
        )
    return kept


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a fraction in [0, 1), got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a fraction in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ShrinkConfig:
    """A validated shrinking configuration, widths and depth (see :func:`~wanda_lightning.shrink` for the meaning of
    each field; how calibration runs is ``options``, a :class:`~wanda_lightning.core.options.CalibrationOptions`).

    Example::

        >>> config = ShrinkConfig.create(mlp=0.5, heads=0.33, method="flap", update="least-squares")
        >>> config.kinds, config.method.describe(), config.options.num_samples
        (('mlp', 'attention'), 'flap (least-squares update)', 128)
    """

    mlp: float
    heads: float
    method: WidthMethod
    widths: str = "uniform"
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    reconstruction: Reconstruction | None = None
    layers: float = 0.0
    layer_score: str = "influence"
    speed_target: SpeedTarget | None = None
    multiple_of: int | None = None

    @classmethod
    def create(
        cls,
        *,
        method: str | WidthMethod = "wanda-sp",
        mlp: float = 0.0,
        heads: float = 0.0,
        update: str | Reconstruction | None = None,
        widths: str = "uniform",
        options: CalibrationOptions | None = None,
        layers: float = 0.0,
        layer_score: str = "influence",
        speedup: float | SpeedTarget | None = None,
        speed_on: str = "decode",
        multiple_of: int | None = None,
    ) -> ShrinkConfig:
        """Checks and resolves every argument; ``options`` defaults to ``CalibrationOptions()``.
        ``update="reconstruct"`` (or a :class:`~wanda_lightning.Reconstruction`) is the least-squares update followed
        by block reconstruction. ``multiple_of`` (a positive integer, or ``None``: :data:`DEFAULT_MULTIPLE` where the
        dense width is a multiple of it) rounds each kept width (:func:`kept_units`, :func:`resolve_multiple`).

        Raises:
            ValueError, TypeError: Naming the argument, the value and what is allowed.
        """
        mlp_fraction, heads_fraction = _fraction(mlp, "mlp"), _fraction(heads, "heads")
        layers_fraction = _fraction(layers, "layers")
        multiple = _multiple_of(multiple_of)
        if multiple is not None and multiple > 1 and widths == "adaptive":
            raise ValueError(
                f"`multiple_of`={multiple} rounds uniform widths, and widths='adaptive' ranks units across layers: "
                "use widths='uniform', or multiple_of=None or 1"
            )
        target = speedup if isinstance(speedup, SpeedTarget) or speedup is None else SpeedTarget(speedup, speed_on)
        asked = {"mlp": mlp_fraction, "heads": heads_fraction, "layers": layers_fraction}
        if target is not None and target.runtime == "llama.cpp" and multiple is not None:
            block = 32 if target.dtype in ("q8_0", "q4_0") else 1  # values per block of a row in these GGUF types
            if multiple % block:
                raise ValueError(
                    f"`multiple_of`={multiple}: the speed target writes its candidates as {target.dtype} GGUF files, "
                    f"whose rows hold blocks of {block} values; use a multiple of {block}, or None"
                )
        if target is not None:
            given = ", ".join(f"`{name}`={value:g}" for name, value in asked.items() if value)
            if given:
                raise ValueError(f"`speedup` chooses `layers`, `mlp` and `heads` itself: leave them at 0, got {given}")
            if widths != "uniform":
                raise ValueError(f"`speedup` times uniform shapes the config describes; got `widths`={widths!r}")
        elif not any(asked.values()):
            raise ValueError("`mlp`, `heads` and `layers` are all 0: nothing to remove; set one of them in (0, 1)")
        if layer_score not in LAYER_SCORES:
            raise ValueError(f"`layer_score` must be one of {list(LAYER_SCORES)}, got {layer_score!r}")
        if update is not None and target is None and mlp_fraction == 0 and heads_fraction == 0:
            raise ValueError(
                f"`update`={update!r} acts on the layers that lose units, and `mlp` and `heads` are 0 (only whole "
                "blocks go): set `mlp` or `heads`, or leave `update` out"
            )
        width_method = get_width_method(method)
        reconstruction = Reconstruction() if update == RECONSTRUCT else update
        if isinstance(reconstruction, Reconstruction):
            width_method = width_method.with_update("least-squares")
        elif update is not None:
            if update not in UPDATES:
                raise ValueError(
                    f"`update` must be one of {[*UPDATES, RECONSTRUCT]} or a Reconstruction, got {update!r}"
                )
            width_method = width_method.with_update(update)
        if widths not in WIDTHS:
            raise ValueError(f"`widths` must be one of {list(WIDTHS)}, got {widths!r}")
        calibration = options_or_default(options)
        if isinstance(reconstruction, Reconstruction) and (widths == "adaptive" or not calibration.sequential):
            what = "widths='adaptive'" if widths == "adaptive" else "sequential=False"
            raise ValueError(
                f"`update`={update!r} trains block by block, and {what} calibrates the whole model in one pass: use "
                "widths='uniform' and sequential=True, or another `update`"
            )
        return cls(
            mlp=mlp_fraction,
            heads=heads_fraction,
            method=width_method,
            widths=widths,
            options=calibration,
            reconstruction=reconstruction if isinstance(reconstruction, Reconstruction) else None,
            layers=layers_fraction,
            layer_score=layer_score,
            speed_target=target,
            multiple_of=multiple,
        )

    def describe_method(self) -> str:
        """The method with its update, and block reconstruction when asked.

        Example::

            >>> ShrinkConfig.create(mlp=0.5, method="flap", update="reconstruct").describe_method()
            'flap (least-squares update) + block reconstruction (64 steps, lr 0.002)'
        """
        described = self.method.describe()
        if self.reconstruction is not None:
            described = f"{described} + {self.reconstruction.describe()}"
        if self.speed_target is not None:
            target = self.speed_target
            where = f", llama.cpp {target.dtype}" if target.runtime == "llama.cpp" else ""
            return f"speed target {target.speedup:g}x ({target.on}{where}) + {described}"
        if not self.layers:
            return described
        depth = f"depth ({self.layer_score})"
        return f"{depth} + {described}" if self.kinds else depth

    @property
    def kinds(self) -> tuple[str, ...]:
        """The unit kinds that lose units: ``"mlp"`` and/or ``"attention"``."""
        return tuple(kind for kind, fraction in (("mlp", self.mlp), ("attention", self.heads)) if fraction > 0)

    def fraction(self, kind: str) -> float:
        """The fraction asked for a kind."""
        return self.mlp if kind == "mlp" else self.heads

    def with_batches_as_given(self) -> ShrinkConfig:
        """A copy that uses calibration batches as they come (for callers that prepared them)."""
        return replace(self, options=self.options.with_batches_as_given())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: the fractions, the method by its :meth:`~wanda_lightning.WidthMethod.describe` name,
        the widths and the calibration options.

        Example::

            >>> ShrinkConfig.create(mlp=0.5).to_dict()["method"]
            'wanda-sp'
        """
        return {
            "mlp": self.mlp,
            "heads": self.heads,
            "layers": self.layers,
            "layer_score": self.layer_score,
            "speedup": self.speed_target.speedup if self.speed_target is not None else None,
            "speed_on": self.speed_target.on if self.speed_target is not None else None,
            "method": self.describe_method(),
            "widths": self.widths,
            "multiple_of": self.multiple_of,
            **self.options.to_dict(),
        }
