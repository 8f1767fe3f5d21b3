"""Sparsity structures: how many weights of each output row are zeroed, and in which pattern."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["SparsityStructure", "parse_structure"]

_N_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityStructure:
    """A validated sparsity pattern.

    Attributes:
        sparsity: Fraction of weights zeroed in every output row, in ``[0, 1)``.
        n: For N:M structures, how many weights are **kept** in each group of ``m`` consecutive input columns.
        m: For N:M structures, the group size along the input dimension; ``None`` when unstructured.

    Example::

        >>> parse_structure("2:4")
        SparsityStructure(sparsity=0.5, n=2, m=4)
        >>> parse_structure("unstructured", 0.6).is_n_m
        False
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_n_m(self) -> bool:
        """Whether this is an N:M (semi-structured) pattern."""
        return self.m is not None

    @property
    def name(self) -> str:
        """``"unstructured"`` or ``"N:M"``."""
        return f"{self.n}:{self.m}" if self.is_n_m else "unstructured"

    def pruned_per_row(self, in_features: int) -> int:
        """Number of weights zeroed in one output row of ``in_features`` columns (unstructured)."""
        if self.is_n_m:
            assert self.m is not None and self.n is not None
            return (in_features // self.m) * (self.m - self.n)
        return int(in_features * self.sparsity)

    def __str__(self) -> str:
        return self.name if self.is_n_m else f"unstructured {self.sparsity:.0%}"


def parse_structure(structure: str, sparsity: float | None = None) -> SparsityStructure:
    """Validates ``structure`` and ``sparsity`` together.

    Args:
        structure: ``"unstructured"`` or ``"N:M"``, where N of every M consecutive weights along the input
            dimension are kept (``"2:4"`` and ``"4:8"`` are 50 %, ``"1:4"`` is 75 %).
        sparsity: Fraction of weights to zero, in ``[0, 1)``. ``None`` means 0.5 when unstructured and the implied
            value for N:M. For N:M an explicit value must equal ``1 - N/M``.

    Returns:
        The parsed structure.

    Raises:
        TypeError: If ``structure`` is not a string or ``sparsity`` is not a real number.
        ValueError: If either is out of range or they contradict each other.

    Example::

        >>> parse_structure("1:4").sparsity
        0.75
    """
    if not isinstance(structure, str):
        raise TypeError(f"`structure` must be a string such as 'unstructured' or '2:4', got {structure!r}")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise TypeError(f"`sparsity` must be a float in [0, 1), got {sparsity!r}")
        if not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}")
    if structure.strip().lower() == "unstructured":
        return SparsityStructure(sparsity=0.5 if sparsity is None else float(sparsity))
    match = _N_M.match(structure)
    if match is None:
        raise ValueError(
            f"`structure` must be 'unstructured' or 'N:M' with integers 0 < N <= M (N kept of every M), "
            f"got {structure!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise ValueError(
            f"`structure` {structure!r} is impossible: N:M keeps N of every M weights, so 0 < N <= M is required"
        )
    implied = 1.0 - n / m
    if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
        raise ValueError(
            f"`sparsity`={sparsity!r} contradicts `structure`={structure!r}, which implies sparsity {implied:g}; "
            "pass sparsity=None (or the implied value) with an N:M structure"
        )
    return SparsityStructure(sparsity=implied, n=n, m=m)
