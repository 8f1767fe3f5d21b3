"""What ``shrink(speedup=...)`` is asked to reach, validated: :class:`SpeedTarget` (the search is
:mod:`~wanda_lightning.width.speedup`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from ..gguf.quantization import check_gguf_type

__all__ = ["SPEED_ON", "SPEED_RUNTIMES", "SpeedOn", "SpeedRuntime", "SpeedTarget"]

SpeedOn = Literal["decode", "prefill"]
SPEED_ON: tuple[str, ...] = get_args(SpeedOn)

#: Where candidate shapes are timed: PyTorch eager (``generate`` on the compute device) or llama.cpp (a GGUF on the
#: CPU, through the optional llama-cpp-python).
SpeedRuntime = Literal["torch", "llama.cpp"]
SPEED_RUNTIMES: tuple[str, ...] = get_args(SpeedRuntime)

# Per runtime: new tokens, prefill length, repeats. llama.cpp runs a 135M model at ~160 tokens/s on 2 cores, so its
# runs are longer (128 single-token evaluations after a 64-token prompt; 256 prefill tokens; best of 5) to be steadier.
_COUNTS = {"torch": (32, 128, 3), "llama.cpp": (128, 256, 5)}


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
            pruning the MLP before attention. Pass e.g. ``(0.0, 1 / 3)`` to search over heads too. Each fraction's
            widths are rounded as ``shrink``'s ``multiple_of`` says; fractions that round to the same shape are timed
            once.
        new_tokens: Tokens decoded per timing run (after a 16-token prompt; 64 in llama.cpp); ``None``: 32, in
            llama.cpp 128.
        prefill_batch: Sequences in the timed prefill pass (1 only in llama.cpp).
        prefill_length: Tokens per sequence in the timed prefill pass; ``None``: 128, in llama.cpp 256.
        repeats: Timed runs per timing (the best is kept); ``None``: 3, in llama.cpp 5.
        runtime: Where the candidates are timed: ``"torch"`` (default; PyTorch eager on the compute device) or
            ``"llama.cpp"``: each shape, built with throw-away weights, is written as a GGUF of type ``dtype`` with a
            placeholder vocabulary (:func:`~wanda_lightning.gguf.save_gguf`) and timed in llama.cpp on the CPU, one
            thread per core (needs llama-cpp-python: ``pip install wanda-lightning[llamacpp]``).
        dtype: The GGUF type timed with ``runtime="llama.cpp"`` (``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``,
            ``"q4_0"``); ``None``: ``"q8_0"``. Must be ``None`` with ``"torch"``, which times the model's own dtype.
        threads: llama.cpp threads with ``runtime="llama.cpp"``; ``None``: one per core (how users run it). On a
            machine busier than its cores, llama.cpp's threads wait for each other at every operation and several
            threads run far slower than one (SmolLM2-135M q8_0 at a load of 10 on 2 cores: 2.5 tokens/s on two
            threads, 34 on one); pass 1 there. Must be ``None`` with ``"torch"``.
        rounds: Turns in which a shape that may reach the target is timed, each right after a dense run, before it is
            judged: its speed-up is the median of its paired ratios, so one disturbed run decides nothing.
        margin: Standard errors the median must clear the target by: the spread of one paired ratio is measured over
            every shape timed in turns (pooled, on the log scale), and a shape meets the target when its median
            divided by ``exp(margin x spread / sqrt(rounds))`` still reaches it (``0``: the median alone). On a
            shared 2-core machine ratios of one shape moved by up to 0.2x between runs, and the search picks the
            lightest shape that meets the target, so without a margin it favours lucky readings (re-timed on its own,
            the choice of ``speedup=1.4`` once measured 1.29x).

    Example::

        >>> SpeedTarget(1.5).layers
        (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
        >>> target = SpeedTarget(1.5, runtime="llama.cpp")
        >>> target.dtype, target.new_tokens, target.repeats
        ('q8_0', 128, 5)
    """

    speedup: float
    on: str = "decode"
    layers: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    mlp: tuple[float, ...] = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8)
    heads: tuple[float, ...] = (0.0,)
    new_tokens: int | None = None  # None: resolved per runtime in __post_init__
    prefill_batch: int = 1
    prefill_length: int | None = None
    repeats: int | None = None
    runtime: str = "torch"
    dtype: str | None = None
    threads: int | None = None
    rounds: int = 3
    margin: float = 1.0

    def __post_init__(self) -> None:
        value = self.speedup
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
            raise ValueError(f"`speedup` must be a number above 1 (1.5: 50 % faster than dense), got {value!r}")
        if self.on not in SPEED_ON:
            raise ValueError(f"`speed_on` must be one of {list(SPEED_ON)}, got {self.on!r}")
        if self.runtime not in SPEED_RUNTIMES:
            raise ValueError(f"`runtime` must be one of {list(SPEED_RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "torch" and self.dtype is not None:
            raise ValueError(
                f"`dtype`={self.dtype!r} is the GGUF type timed with runtime='llama.cpp'; runtime='torch' times the "
                "model in its own dtype (leave it None)"
            )
        if self.threads is not None:
            if self.runtime == "torch":
                raise ValueError(
                    f"`threads`={self.threads!r} sets llama.cpp's threads; runtime='torch' uses torch's own setting "
                    "(leave it None)"
                )
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
                raise ValueError(f"`threads` must be a positive integer or None (one per core), got {self.threads!r}")
        if self.runtime == "llama.cpp":
            object.__setattr__(self, "dtype", check_gguf_type("q8_0" if self.dtype is None else self.dtype))
            if self.prefill_batch != 1:
                raise ValueError(
                    f"runtime='llama.cpp' times batch 1: `prefill_batch` must be 1, got {self.prefill_batch!r}"
                )
        for name, default in zip(("new_tokens", "prefill_length", "repeats"), _COUNTS[self.runtime], strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        margin = self.margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ValueError(f"`margin` must be a number of standard errors >= 0 (1: one), got {margin!r}")
        for name in ("new_tokens", "prefill_batch", "prefill_length", "repeats", "rounds"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {count!r}")
        for name in ("layers", "mlp", "heads"):
            if any(not 0 <= f < 1 for f in getattr(self, name)):
                raise ValueError(f"`{name}` fractions must lie in [0, 1), got {getattr(self, name)!r}")
