"""Mask selection from importance scores: pure, vectorised torch functions.

All functions take a float ``scores`` matrix of shape ``(out_features, in_features)`` (higher = more important) and
return a boolean **keep** mask of the same shape. Comparison groups are always single output rows, as in the Wanda
paper. Ties are broken deterministically: among equal scores the lower column index is pruned first, which is what a
stable ascending sort (the reference code's ``torch.sort(..., stable=True)``) does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["keep_mask", "lowest_mask", "n_m_keep_mask", "unstructured_keep_mask", "variant_keep_mask"]


def lowest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` lowest entries along the last dim, ties to the lower index: the entries to prune.

    Uses ``kthvalue`` (linear-time selection) instead of a full sort; exact ties at the threshold are resolved with a
    cumulative count only on the rows that have them.

    Args:
        scores: Scores of any shape; each slice along the last dim is one comparison group.
        k: How many entries to mark in each group; ``<= 0`` marks none, ``>=`` the group size marks all.

    Returns:
        A boolean tensor shaped like ``scores``, ``True`` at the ``k`` lowest entries of each group.

    Example::

        >>> lowest_mask(torch.tensor([[3.0, 1.0, 1.0, 2.0]]), 2)
        tensor([[False,  True,  True, False]])
    """
    size = scores.shape[-1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values  # (..., 1)
    prune = scores <= threshold
    counts = prune.sum(dim=-1)
    tied = counts != k
    if bool(tied.any()):
        # Rows with several entries equal to the threshold: prune those below it, then the first equal ones.
        rows = scores[tied]
        row_threshold = threshold[tied]
        below = rows < row_threshold
        equal = rows == row_threshold
        room = k - below.sum(dim=-1, keepdim=True)
        prune[tied] = below | (equal & (equal.cumsum(dim=-1) <= room))
    return prune


def unstructured_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Zeroes exactly ``floor(in_features * sparsity)`` lowest-scoring weights in every output row.

    Args:
        scores: ``(out_features, in_features)`` importance scores.
        sparsity: Fraction in ``[0, 1)``.

    Returns:
        ``(out_features, in_features)`` boolean keep mask.

    Example::

        >>> unstructured_keep_mask(torch.tensor([[3.0, 1.0, 2.0, 0.5]]), 0.5)
        tensor([[ True, False,  True, False]])
    """
    k = int(scores.shape[-1] * sparsity)
    return ~lowest_mask(scores, k)


def n_m_keep_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keeps the ``n`` highest scores in every group of ``m`` consecutive input columns of every row.

    Args:
        scores: ``(out_features, in_features)`` scores; ``in_features`` must be a multiple of ``m``.
        n: Weights kept per group.
        m: Group size.

    Returns:
        ``(out_features, in_features)`` boolean keep mask with exactly ``n`` True values per group.

    Example::

        >>> n_m_keep_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]]), 2, 4)
        tensor([[ True, False,  True, False, False,  True,  True, False]])
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)  # (out, in / M, M)
    return ~lowest_mask(groups, m - n).reshape(rows, cols)


def _variant_prune_for_alpha(
    scores: Tensor, sorted_scores: Tensor, cumulative: Tensor, totals: Tensor, alpha: float
) -> Tensor:
    counts = (cumulative <= totals * alpha).sum(dim=1, keepdim=True)  # (out, 1)
    threshold = torch.gather(sorted_scores, 1, (counts - 1).clamp_min(0))
    # A row whose smallest score already exceeds alpha x row total prunes nothing.
    threshold = torch.where(counts > 0, threshold, torch.full_like(threshold, -torch.inf))
    return scores <= threshold


def variant_keep_mask(
    scores: Tensor,
    sparsity: float,
    *,
    alpha: float = 0.4,
    alpha_range: tuple[float, float] = (0.0, 0.8),
    tol: float = 1e-3,
) -> Tensor:
    """The Wanda reference code's ``--use_variant`` mask.

    In every row, weights whose ascending cumulative score stays within ``alpha`` times the row's total are pruned;
    one ``alpha`` per layer is found by bisection so that the layer's sparsity is within ``tol`` of ``sparsity``
    (start 0.4, range [0, 0.8], stopping when the range narrows below ``tol``).

    Args:
        scores: ``(out_features, in_features)`` scores.
        sparsity: Target layer sparsity in ``[0, 1)``.
        alpha: Starting ratio.
        alpha_range: Bisection bracket.
        tol: Tolerance on the achieved sparsity and on the bracket width.

    Returns:
        ``(out_features, in_features)`` boolean keep mask; its sparsity is close to, not exactly, ``sparsity``.

    Example::

        >>> keep = variant_keep_mask(torch.rand(64, 128, generator=torch.Generator().manual_seed(0)), 0.5)
        >>> abs((~keep).float().mean().item() - 0.5) < 0.01
        True
    """
    sorted_scores = torch.sort(scores, dim=1, stable=True).values
    cumulative = torch.cumsum(sorted_scores, dim=1)
    totals = scores.sum(dim=1, keepdim=True)  # (out, 1)
    low, high = alpha_range
    prune = _variant_prune_for_alpha(scores, sorted_scores, cumulative, totals, alpha)
    # Sparsity as a float32 tensor, compared in float32: the reference code's arithmetic, so that a layer exactly
    # `tol` away from the target stops where the reference stops.
    current = prune.sum() / prune.numel()
    while bool(abs(current - sparsity) > tol) and high - low >= tol:
        if current > sparsity:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        prune = _variant_prune_for_alpha(scores, sorted_scores, cumulative, totals, alpha)
        current = prune.sum() / prune.numel()
    return ~prune


def keep_mask(scores: Tensor, sparsity: float, n: int | None = None, m: int | None = None) -> Tensor:
    """Dispatches to :func:`n_m_keep_mask` when ``m`` is given, else :func:`unstructured_keep_mask`.

    Example::

        >>> keep_mask(torch.arange(8.0).view(1, 8), 0.5, 2, 4).sum().item()
        4
    """
    if m is not None:
        assert n is not None
        return n_m_keep_mask(scores, n, m)
    return unstructured_keep_mask(scores, sparsity)
