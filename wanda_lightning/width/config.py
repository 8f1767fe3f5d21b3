"""What a width-pruning run does, validated once: :class:`ShrinkConfig`, shared by ``shrink()``, the callback and the
CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch

from ..core.validation import as_device, check_bool, check_positive
from .methods import WidthMethod, get_width_method

__all__ = ["WIDTHS", "ShrinkConfig", "Widths", "units_to_remove"]

Widths = Literal["uniform", "adaptive"]
WIDTHS: tuple[str, ...] = get_args(Widths)


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a fraction in [0, 1), got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a fraction in [0, 1), got {value!r}")
    return float(value)


def units_to_remove(fraction: float, units: int, argument: str, where: str) -> int:
    """``fraction * units`` rounded to the nearest whole unit (halves up), refusing a non-zero fraction that removes no
    unit or every unit.

    Example::

        >>> units_to_remove(0.33, 3, "heads", "model.layers.0.self_attn.o_proj")
        1
        >>> units_to_remove(0.1, 3, "heads", "o_proj")
        Traceback (most recent call last):
        ...
        ValueError: `heads`=0.1 of 3 units in o_proj rounds to none; use at least 0.166667 (one unit), or 0
    """
    count = math.floor(fraction * units + 0.5)
    if fraction > 0 and count == 0:
        raise ValueError(
            f"`{argument}`={fraction:g} of {units} units in {where} rounds to none; use at least "
            f"{0.5 / units:g} (one unit), or 0"
        )
    if count >= units:
        raise ValueError(f"`{argument}`={fraction:g} of {units} units in {where} removes all of them; use less")
    return count


@dataclass(frozen=True)
class ShrinkConfig:
    """A validated width-pruning configuration (see :func:`~wanda_lightning.shrink` for the meaning of each field).

    Example::

        >>> config = ShrinkConfig.create(mlp=0.5, heads=0.33, method="flap", update="least-squares")
        >>> config.kinds, config.method.describe()
        (('mlp', 'attention'), 'flap (least-squares update)')
    """

    mlp: float
    heads: float
    method: WidthMethod
    widths: str = "uniform"
    sequential: bool = True
    blocks: str | None = None
    num_samples: int | None = 128
    batch_size: int | None = None
    device: torch.device | None = None
    offload_device: torch.device | None = None

    @classmethod
    def create(
        cls,
        *,
        mlp: float = 0.0,
        heads: float = 0.0,
        method: str | WidthMethod = "wanda-sp",
        update: str | None = None,
        widths: str = "uniform",
        sequential: bool = True,
        blocks: str | None = None,
        num_samples: int | None = 128,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        offload_device: str | torch.device | None = None,
    ) -> ShrinkConfig:
        """Checks and resolves every argument.

        Raises:
            ValueError, TypeError: Naming the argument, the value and what is allowed.
        """
        mlp_fraction, heads_fraction = _fraction(mlp, "mlp"), _fraction(heads, "heads")
        if mlp_fraction == 0 and heads_fraction == 0:
            raise ValueError("`mlp` and `heads` are both 0: nothing to remove; set one of them in (0, 1)")
        width_method = get_width_method(method)
        if update is not None:
            width_method = width_method.with_update(update)
        if widths not in WIDTHS:
            raise ValueError(f"`widths` must be one of {list(WIDTHS)}, got {widths!r}")
        check_bool(sequential, "sequential")
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise TypeError(f"`blocks` must be a module name such as 'model.layers' or None, got {blocks!r}")
        check_positive(num_samples, "num_samples")
        check_positive(batch_size, "batch_size")
        return cls(
            mlp=mlp_fraction,
            heads=heads_fraction,
            method=width_method,
            widths=widths,
            sequential=sequential,
            blocks=blocks,
            num_samples=num_samples,
            batch_size=batch_size,
            device=as_device(device, "device"),
            offload_device=as_device(offload_device, "offload_device"),
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The unit kinds that lose units: ``"mlp"`` and/or ``"attention"``."""
        return tuple(kind for kind, fraction in (("mlp", self.mlp), ("attention", self.heads)) if fraction > 0)

    def fraction(self, kind: str) -> float:
        """The fraction asked for a kind."""
        return self.mlp if kind == "mlp" else self.heads

    def with_batches_as_given(self) -> ShrinkConfig:
        """A copy that uses calibration batches as they come (for callers that prepared them)."""
        return replace(self, num_samples=None, batch_size=None)
