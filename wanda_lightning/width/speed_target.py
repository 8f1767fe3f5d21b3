"""What ``shrink(speedup=...)`` is asked to reach, validated: :class:`SpeedTarget` (the search is
:mod:`~wanda_lightning.width.speedup`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["SPEED_ON", "SpeedOn", "SpeedTarget"]

SpeedOn = Literal["decode", "prefill"]
SPEED_ON: tuple[str, ...] = get_args(SpeedOn)


@dataclass(frozen=True)
class SpeedTarget:
    """What the speed target searches.

    Attributes:
        speedup: The speed-up over the dense model to reach (> 1).
        on: ``"decode"`` (batch 1, KV cache; default) or ``"prefill"``.
        layers: Depth fractions tried.
        mlp: MLP fractions tried, in steps of 0.1 above one half: on SmolLM2-135M (CPU, batch-1 decode) the speed-up
            grows fastest there, and with the coarser (0, 0.25, 0.5, 0.75) no width-only shape lay between 1.47x and
            the grid's end, so a 1.5x target could only be met by removing blocks or a key/value group too.
        heads: Head fractions tried. By default every head is kept: on SmolLM2-135M at about 1.5x decode, shapes that
            lost one of the three key/value groups started recovery as well as width-only shapes of the same speed
            (8.42x against 8.40x the teacher) and ended 200 distillation steps worse (3.15x and 3.50x against 2.96x
            and 2.51x), which the one-shot quality estimate cannot see; Minitron and Model-Optimizer also advise
            pruning the MLP before attention. Pass e.g. ``(0.0, 1 / 3)`` to search over heads too.
        new_tokens: Tokens decoded per timing run (after a 16-token prompt).
        prefill_batch: Sequences in the timed prefill pass.
        prefill_length: Tokens per sequence in the timed prefill pass.
        repeats: Timed runs per candidate (the best is kept).

    Example::

        >>> SpeedTarget(1.5).layers
        (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    """

    speedup: float
    on: str = "decode"
    layers: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    mlp: tuple[float, ...] = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8)
    heads: tuple[float, ...] = (0.0,)
    new_tokens: int = 32
    prefill_batch: int = 1
    prefill_length: int = 128
    repeats: int = 3

    def __post_init__(self) -> None:
        value = self.speedup
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
            raise ValueError(f"`speedup` must be a number above 1 (1.5: 50 % faster than dense), got {value!r}")
        if self.on not in SPEED_ON:
            raise ValueError(f"`speed_on` must be one of {list(SPEED_ON)}, got {self.on!r}")
        for name in ("new_tokens", "prefill_batch", "prefill_length", "repeats"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {count!r}")
        for name in ("layers", "mlp", "heads"):
            if any(not 0 <= f < 1 for f in getattr(self, name)):
                raise ValueError(f"`{name}` fractions must lie in [0, 1), got {getattr(self, name)!r}")
