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

__all__ = ["RECONSTRUCT", "WIDTHS", "ShrinkConfig", "Widths", "units_to_remove"]

#: The ``update`` that refits with least squares, then trains each block to its dense outputs (default settings).
RECONSTRUCT = "reconstruct"

Widths = Literal["uniform", "adaptive"]
WIDTHS: tuple[str, ...] = get_args(Widths)


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
    ) -> ShrinkConfig:
        """Checks and resolves every argument; ``options`` defaults to ``CalibrationOptions()``.
        ``update="reconstruct"`` (or a :class:`~wanda_lightning.Reconstruction`) is the least-squares update followed
        by block reconstruction.

        Raises:
            ValueError, TypeError: Naming the argument, the value and what is allowed.
        """
        mlp_fraction, heads_fraction = _fraction(mlp, "mlp"), _fraction(heads, "heads")
        layers_fraction = _fraction(layers, "layers")
        target = speedup if isinstance(speedup, SpeedTarget) or speedup is None else SpeedTarget(speedup, speed_on)
        asked = {"mlp": mlp_fraction, "heads": heads_fraction, "layers": layers_fraction}
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
            return f"speed target {self.speed_target.speedup:g}x ({self.speed_target.on}) + {described}"
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
        """JSON-ready description: the fractions, the method by its :meth:`describe` name, the widths and the
        calibration options.

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
            **self.options.to_dict(),
        }
