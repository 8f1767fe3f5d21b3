"""Argument checks shared by ``prune()``, the Lightning callback and the command line.

Each check raises ``ValueError`` or ``TypeError`` naming the argument (``name``: ``"num_samples"`` in Python,
``"--samples"`` on the command line), the value found and what is allowed. The callback turns them into
``MisconfigurationException`` in one place; the command line prints them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from typing import Any

import torch

__all__ = [
    "as_device",
    "check_bool",
    "check_choice",
    "check_directory",
    "check_number",
    "check_positive",
    "describe_argument",
    "units_to_remove",
]


def describe_argument(name: str) -> str:
    """``"num_samples"`` -> ``"`num_samples`"`` (a Python argument), ``"--samples"`` stays as is (a flag)."""
    return name if name.startswith("-") else f"`{name}`"


def check_positive(value: Any, name: str, *, allow_none: bool = True) -> None:
    """Raises unless ``value`` is a positive ``int`` (or ``None`` when ``allow_none``).

    Example::

        >>> check_positive(3, "num_samples")
        >>> check_positive(0, "--samples", allow_none=False)
        Traceback (most recent call last):
        ...
        ValueError: --samples must be a positive integer, got 0
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{describe_argument(name)} must be {allowed}, got {value!r}")


def check_bool(value: Any, name: str) -> None:
    """Raises ``TypeError`` unless ``value`` is ``True`` or ``False``.

    Example::

        >>> check_bool(1, "sequential")
        Traceback (most recent call last):
        ...
        TypeError: `sequential` must be True or False, got 1
    """
    if not isinstance(value, bool):
        raise TypeError(f"{describe_argument(name)} must be True or False, got {value!r}")


def check_number(value: Any, name: str, low: float, high: float, *, closed: bool) -> float:
    """Returns ``value`` as a float if it is a number in ``[low, high]`` (``closed``) or ``(low, high)``, else raises.

    Example::

        >>> check_number(0.5, "distill_weight", 0.0, 1.0, closed=True)
        0.5
        >>> check_number(0, "temperature", 0.0, float("inf"), closed=False)
        Traceback (most recent call last):
        ...
        ValueError: `temperature` must be in (0, inf), got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{describe_argument(name)} must be a number, got {value!r}")
    inside = low <= value <= high if closed else low < value < high
    if not inside:
        interval = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
        raise ValueError(f"{describe_argument(name)} must be in {interval}, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """Returns ``value`` lower-cased if it is one of ``choices`` (case-insensitive), else raises ``ValueError``.

    Example::

        >>> check_choice("OWL", "allocation", ("uniform", "owl"))
        'owl'
    """
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ValueError(f"{describe_argument(name)} must be one of {list(choices)}, got {value!r}")


def as_device(value: Any, name: str, *, must_exist: bool = False) -> torch.device | None:
    """Parses a device argument (``None`` passes through).

    Args:
        value: ``None``, a ``torch.device`` or a string such as ``"cpu"`` or ``"cuda:0"``.
        name: The argument's name for the message.
        must_exist: Also refuse a CUDA device when this machine has none.

    Example::

        >>> as_device("cpu", "device")
        device(type='cpu')
        >>> as_device("gpu0", "--device")
        Traceback (most recent call last):
        ...
        ValueError: --device must be a torch device such as 'cpu' or 'cuda:0', got 'gpu0'
    """
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{describe_argument(name)} must be a torch device such as 'cpu' or 'cuda:0', got {value!r}"
        ) from None
    if must_exist and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{describe_argument(name)} {str(value)!r}: CUDA is not available on this machine "
            f"(torch {torch.__version__})"
        )
    return device


def check_directory(value: Any, name: str) -> None:
    """Raises ``TypeError`` unless ``value`` is a non-empty directory path (``str`` or ``os.PathLike``) or ``None``.

    Example::

        >>> check_directory("out/", "save_dir")
        >>> check_directory(3, "save_dir")
        Traceback (most recent call last):
        ...
        TypeError: `save_dir` must be a directory path or None, got 3
    """
    if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
        raise TypeError(f"{describe_argument(name)} must be a directory path or None, got {value!r}")


def units_to_remove(fraction: float, units: int, argument: str, where: str, noun: str = "unit") -> int:
    """``fraction * units`` rounded to the nearest whole unit (halves up), refusing a non-zero fraction that removes no
    unit or every unit; ``noun`` names a unit in messages.

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
            f"`{argument}`={fraction:g} of {units} {noun}s in {where} rounds to none; use at least "
            f"{0.5 / units:g} (one {noun}), or 0"
        )
    if count >= units:
        raise ValueError(f"`{argument}`={fraction:g} of {units} {noun}s in {where} removes all of them; use less")
    return count
