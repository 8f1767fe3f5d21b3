"""Training-free mask refinement: DSnoT (Zhang et al., ICLR 2024), guarded by the exact reconstruction error."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .statistics import GramStatistics, LayerStatistics
from .structure import SparsityStructure

__all__ = ["DSnoT", "dsnot_refine", "get_refinement", "reconstruction_error"]


def reconstruction_error(dense: Tensor, pruned: Tensor, gram: Tensor) -> Tensor:
    """``||(dense - pruned) X||_F^2`` over the calibration tokens, from the Gram matrix ``X^T X``.

    Example::

        >>> x = torch.randn(32, 4); w = torch.randn(3, 4); p = w * (torch.rand(3, 4) > 0.5)
        >>> exact = ((w - p) @ x.t()).square().sum().item()
        >>> abs(reconstruction_error(w, p, x.t() @ x).item() - exact) <= 1e-4 * exact
        True
    """
    delta = (dense.float() - pruned.float()).double()
    return ((delta @ gram.double()) * delta).sum()


def _prune_order(candidates: Tensor, signal: Tensor) -> Tensor:
    """DSnoT's pruning order: negative-signal candidates first (weakest first), then the rest weakest last."""
    columns = candidates.shape[1]
    position = torch.arange(columns, device=candidates.device).expand_as(candidates)
    negative = signal.gather(1, candidates) < 0
    key = torch.where(negative, position, 2 * columns - position)
    return candidates.gather(1, torch.argsort(key, dim=1, stable=True))


@torch.no_grad()
def dsnot_refine(
    dense: Tensor,
    current: Tensor,
    keep: Tensor,
    statistics: GramStatistics,
    n: int | None = None,
    m: int | None = None,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    variance_power: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Swaps pruned and kept weights within rows to shrink the layer's reconstruction error.

    DSnoT's rules pick the candidates: the expected output error of a row, ``e = sum_j dW_j * s_j`` (``s``: per-
    sequence input sums), is pushed towards zero by regrowing the pruned weight with the largest ``W_j s_j / var_j`` of
    ``e``'s sign and pruning the kept weight (lowest Wanda score first) that moves ``e`` back the least; a row stops
    once ``|e|`` falls under ``update_threshold`` or would change sign. Each swap is then accepted only if it lowers the
    row's exact error ``dW G dW^T`` (``G = X^T X``), so the layer's reconstruction error never grows. For N:M the
    pruned weight comes from the regrown weight's own group, so the pattern is kept.

    Args:
        dense: ``(out, in)`` weights before pruning.
        current: ``(out, in)`` weights after pruning (pruned entries 0; kept ones possibly updated).
        keep: ``(out, in)`` bool keep mask.
        statistics: The layer's :class:`GramStatistics`.
        n: Kept per group (N:M), or ``None``.
        m: Group size (N:M), or ``None``.
        max_cycles: Most swap rounds (default 50).
        update_threshold: Rows whose ``|e|`` is at most this stop (default 0.1).
        variance_power: Power of the input variance dividing the regrowth score (default 1).

    Returns:
        ``(keep, weights)``: the refined mask (same count per row, or per group) and float32 weights.
    """
    rows, columns = dense.shape
    dense = dense.float()
    weights = current.float().clone()
    keep = keep.clone()
    gram = statistics.gram.to(dense.device)
    per_sequence_sum = (statistics.sum / max(statistics.num_sequences, 1)).to(dense.device)  # (in,)
    variance = statistics.variance.to(dense.device).clamp_min(1e-12)
    signal = dense * per_sequence_sum.unsqueeze(0)  # (out, in): DSnoT's W_j * s_j
    delta = dense - weights  # (out, in): what the pruned layer misses
    error = (delta * per_sequence_sum.unsqueeze(0)).sum(dim=1)  # (out,)
    initial_sign = torch.sign(error)
    projected = delta @ gram  # (out, in): dW G, kept in step for the exact check
    gram_diagonal = torch.diagonal(gram)
    wanda = dense.abs() * statistics.mean_sq_norm.to(dense.device).sqrt().unsqueeze(0)
    row_index = torch.arange(rows, device=dense.device)

    regrow_score = torch.where(keep, torch.zeros_like(signal), signal / variance.pow(variance_power).unsqueeze(0))
    regrow_order = torch.argsort(regrow_score, dim=1, stable=True)
    regrow_low = torch.zeros(rows, dtype=torch.long, device=dense.device)
    regrow_high = torch.full_like(regrow_low, columns - 1)
    if m is None:
        kept_count = int(keep.sum(dim=1).max())
        by_wanda = torch.argsort(torch.where(keep, wanda, torch.full_like(wanda, math.inf)), dim=1, stable=True)
        prune_order = _prune_order(by_wanda[:, :kept_count], signal)
        prune_low = torch.zeros_like(regrow_low)
        prune_high = torch.full_like(regrow_low, max(kept_count - 1, 0))
    else:
        # Only weights kept by the starting mask may be pruned, each at most once.
        prunable = torch.where(keep, wanda, torch.full_like(wanda, math.inf))
    active = torch.ones(rows, dtype=torch.bool, device=dense.device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        grow_high = error > 0
        grow = regrow_order[row_index, torch.where(grow_high, regrow_high, regrow_low).clamp(0, columns - 1)]
        regrow_high -= grow_high.long()
        regrow_low += (~grow_high).long()
        if m is None:
            prune_high_side = error < 0
            cut = prune_order[
                row_index, torch.where(prune_high_side, prune_high, prune_low).clamp(0, max(kept_count - 1, 0))
            ]
            prune_high -= prune_high_side.long()
            prune_low += (~prune_high_side).long()
        else:
            start = grow - grow % m  # (out,)
            group = start.unsqueeze(1) + torch.arange(m, device=dense.device)  # (out, M)
            cut = start + prunable.gather(1, group).argmin(dim=1)
        grown_change = delta[row_index, grow] * per_sequence_sum[grow]
        cut_weight = weights[row_index, cut]
        cut_change = cut_weight * per_sequence_sum[cut]
        after = error + cut_change - grown_change
        active &= (error.abs() > update_threshold) & (torch.sign(after) == initial_sign)
        valid = ~keep[row_index, grow] & keep[row_index, cut] & (grow != cut)
        if m is not None:
            valid &= torch.isfinite(prunable[row_index, cut])
        grown_delta = delta[row_index, grow]
        change = (
            2 * (cut_weight * projected[row_index, cut] - grown_delta * projected[row_index, grow])
            + cut_weight.square() * gram_diagonal[cut]
            + grown_delta.square() * gram_diagonal[grow]
            - 2 * cut_weight * grown_delta * gram[grow, cut]
        )
        accept = active & valid & (change < 0)
        if not bool(accept.any()):
            continue
        r, g, c = row_index[accept], grow[accept], cut[accept]
        projected[r] += cut_weight[accept].unsqueeze(1) * gram[c] - grown_delta[accept].unsqueeze(1) * gram[g]
        keep[r, g] = True
        keep[r, c] = False
        weights[r, g] = dense[r, g]
        weights[r, c] = 0.0
        delta[r, g] = 0.0
        delta[r, c] = dense[r, c]
        error = torch.where(accept, after, error)
        if m is not None:
            prunable[r, c] = math.inf
    return keep, weights


class DSnoT:
    """DSnoT refinement on top of any method's mask (see :func:`dsnot_refine`).

    Args:
        max_cycles: Most swap rounds per layer (default 50, as the reference code).
        update_threshold: Stop a row once its expected output error is this small (default 0.1).
        variance_power: Power of the input variance in the regrowth score (default 1).

    Example::

        >>> DSnoT().describe()
        'dsnot'
    """

    name = "dsnot"

    def __init__(self, max_cycles: int = 50, update_threshold: float = 0.1, variance_power: float = 1.0) -> None:
        if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 1:
            raise ValueError(f"DSnoT `max_cycles` must be a positive integer, got {max_cycles!r}")
        if not update_threshold >= 0:
            raise ValueError(f"DSnoT `update_threshold` must be >= 0, got {update_threshold!r}")
        self.max_cycles = max_cycles
        self.update_threshold = float(update_threshold)
        self.variance_power = float(variance_power)

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return GramStatistics(in_features, device)

    def refine(
        self, dense: Tensor, weight: Tensor, keep: Tensor, statistics: LayerStatistics, structure: SparsityStructure
    ) -> Tensor:
        """Refines ``keep`` and writes the refined weights into ``weight`` (in place); returns the new mask."""
        if not isinstance(statistics, GramStatistics):
            raise TypeError("DSnoT needs GramStatistics from calibration")
        new_keep, new_weight = dsnot_refine(
            dense,
            weight,
            keep,
            statistics,
            structure.n,
            structure.m,
            max_cycles=self.max_cycles,
            update_threshold=self.update_threshold,
            variance_power=self.variance_power,
        )
        weight.copy_(new_weight)
        return new_keep

    def describe(self) -> str:
        return "dsnot"

    def __repr__(self) -> str:
        return (
            f"DSnoT(max_cycles={self.max_cycles}, update_threshold={self.update_threshold}, "
            f"variance_power={self.variance_power})"
        )


def get_refinement(refine: str | DSnoT | None) -> DSnoT | None:
    """Resolves ``refine`` (``None``, ``"none"``, ``"dsnot"`` or a :class:`DSnoT` instance).

    Example::

        >>> get_refinement("dsnot")
        DSnoT(max_cycles=50, update_threshold=0.1, variance_power=1.0)
    """
    if refine is None or isinstance(refine, DSnoT):
        return refine
    if isinstance(refine, str) and refine.lower() in ("none", "dsnot"):
        return DSnoT() if refine.lower() == "dsnot" else None
    raise ValueError(f"`refine` must be one of ['none', 'dsnot'] or a DSnoT instance, got {refine!r}")
