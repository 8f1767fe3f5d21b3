"""Layer-wise sparsity allocation: OWL (Outlier-Weighed Layerwise sparsity, Yin et al., ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["OWL", "owl_outlier_ratio", "owl_sparsities"]


def owl_outlier_ratio(scores: Sequence[Tensor], m: float, all_reduce: Callable[[Tensor], None] | None = None) -> float:
    """Share of scores above ``m`` times the mean score of a group of layers (one decoder block).

    The mean is taken over all the group's scores together, as OWL does on their concatenation (computed here
    without concatenating).

    Args:
        scores: The group's score matrices.
        m: Outlier threshold as a multiple of the mean.
        all_reduce: For row shards of the scores spread over processes: an in-place sum across them, so that the
            mean and the count are those of the whole matrices.

    Example::

        >>> owl_outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], m=2.0)
        0.25
    """
    totals = torch.tensor(
        [sum(float(s.double().sum()) for s in scores), float(sum(s.numel() for s in scores))], dtype=torch.float64
    )
    if all_reduce is not None:
        all_reduce(totals)
    total, count = float(totals[0]), float(totals[1])
    threshold = m * total / count
    outliers = torch.tensor([float(sum(int((s > threshold).sum()) for s in scores))], dtype=torch.float64)
    if all_reduce is not None:
        all_reduce(outliers)
    return float(outliers[0]) / count


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL's per-group sparsities: more outliers, lower sparsity; the mean equals ``sparsity``.

    Ratios are min-max normalised to ``[0, 2 * lam]``, centred, and subtracted from ``sparsity``.

    Raises:
        ValueError: If a group would get a sparsity outside ``[0, 1)``.

    Example::

        >>> [round(s, 3) for s in owl_sparsities([0.01, 0.02, 0.03], 0.5, 0.08)]
        [0.58, 0.5, 0.42]
    """
    values = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(values.max() - values.min()) if values.numel() else 0.0
    if values.numel() == 0 or spread == 0.0:
        return [sparsity] * values.numel()
    normalised = (values - values.min()) / spread * (2 * lam)
    result = (sparsity - (normalised - normalised.mean())).tolist()
    low, high = min(result), max(result)
    if low < 0.0 or high >= 1.0:
        raise ValueError(
            f"OWL with lam={lam} around sparsity={sparsity} gives block sparsities from {low:.3f} to {high:.3f}, "
            f"outside [0, 1): lower `lam` (at most {min(sparsity, 1 - sparsity) / 2:.3f} is always safe)"
        )
    return result


class OWL:
    """Outlier-Weighed Layerwise sparsity: each block's sparsity from its share of outlier Wanda scores.

    A block whose Wanda scores (``|W| * ||X||`` from a dense calibration pass) hold more values above ``m`` times
    their mean keeps more weights; block sparsities span at most ``2 * lam`` and average to the target. Works with
    every method; N:M structures fix the sparsity of every group, so OWL refuses them.

    Args:
        m: Outlier threshold as a multiple of the block's mean score (default 5).
        lam: Half-width of the sparsity range (default 0.08).

    Example::

        >>> OWL(m=5, lam=0.08).describe()
        'owl (M=5, lambda=0.08)'
    """

    name = "owl"

    def __init__(self, m: float = 5.0, lam: float = 0.08) -> None:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
            raise ValueError(f"OWL `m` must be a positive number, got {m!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < 0.5:
            raise ValueError(f"OWL `lam` must be in [0, 0.5), got {lam!r}")
        self.m = float(m)
        self.lam = float(lam)

    def allocate(
        self,
        groups: Iterable[Sequence[Tensor]],
        sparsity: float,
        all_reduce: Callable[[Tensor], None] | None = None,
    ) -> tuple[list[float], list[float]]:
        """``(sparsities, outlier_ratios)``, one per group of score matrices (a group per block).

        Args:
            groups: The groups' score matrices; a generator keeps one group's scores alive at a time.
            sparsity: The target mean sparsity.
            all_reduce: For row shards of the scores spread over processes (see :func:`owl_outlier_ratio`).

        Example::

            >>> scores = [[torch.tensor([1.0, 1.0, 1.0, 9.0])], [torch.tensor([1.0, 1.0, 1.0, 1.0])]]
            >>> OWL(m=2.0, lam=0.05).allocate(scores, 0.5)
            ([0.45, 0.55], [0.25, 0.0])
        """
        ratios = [owl_outlier_ratio(scores, self.m, all_reduce) for scores in groups]
        return owl_sparsities(ratios, sparsity, self.lam), ratios

    def describe(self) -> str:
        return f"owl (M={self.m:g}, lambda={self.lam:g})"

    def __repr__(self) -> str:
        return f"OWL(m={self.m}, lam={self.lam})"
