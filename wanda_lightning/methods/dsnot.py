"""Training-free mask refinement: DSnoT (Zhang et al., ICLR 2024), guarded by the exact reconstruction error."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.statistics import GramStatistics, LayerStatistics, MomentStatistics, expect_statistics
from ..core.structure import SparsityStructure
from .base import Refinement

__all__ = ["DSnoT", "dsnot_refine", "reconstruction_error"]

_GUARDS = ("expected", "exact", "none")


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


def _first(key: Tensor, k: int) -> Tensor:
    """``(rows, k)`` column indices of the ``k`` lowest entries of each row of ``key``, in increasing order."""
    return torch.topk(key, k, dim=1, largest=False, sorted=True).indices


@torch.no_grad()
def dsnot_refine(
    dense: Tensor,
    current: Tensor,
    keep: Tensor,
    statistics: MomentStatistics,
    n: int | None = None,
    m: int | None = None,
    *,
    guard: str = "expected",
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    variance_power: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Swaps pruned and kept weights within rows to shrink the layer's reconstruction error (DSnoT's rules).

    A row's expected output error over a calibration sequence is ``e = sum_j dW_j s_j`` (``dW``: dense minus pruned
    weights, ``s``: per-sequence input sums). In each cycle every row regrows its next pruned weight in order of
    ``d * W_j s_j / var_j^p`` (largest first; ``d`` is the sign of the row's starting ``e``) and prunes its next kept
    weight: first those whose ``W_j s_j`` has the sign opposite to ``d``, weakest Wanda score first, then the others,
    strongest first (for N:M: the weakest still-prunable weight of the regrown weight's group, so the pattern holds).
    A row stops for good once ``|e| <= update_threshold``, once the swap would flip ``e``'s sign, or once it runs out
    of candidates; at most ``max_cycles`` cycles. ``guard`` decides whether a candidate swap is made:

    - ``"expected"``: if it lowers the row's expected squared output error per token under DSnoT's model of the
      inputs (independent features): ``(sum_j dW_j mu_j)^2 + sum_j dW_j^2 var_j``. Needs only per-feature means and
      variances (:class:`MomentStatistics`, Wanda's calibration cost).
    - ``"exact"``: if it lowers the row's exact error ``dW G dW^T`` (``G = X^T X``), so the layer's reconstruction
      error never grows. Needs the input Gram matrix (:class:`GramStatistics`).
    - ``"none"``: always, as the paper's code does.

    All rows move at once; each row's candidates are the ``max_cycles`` first of its two orders (``topk``).

    Args:
        dense: ``(out, in)`` weights before pruning.
        current: ``(out, in)`` weights after pruning (pruned entries 0; kept ones possibly updated).
        keep: ``(out, in)`` bool keep mask.
        statistics: The layer's :class:`MomentStatistics` (:class:`GramStatistics` for ``guard="exact"``).
        n: Kept per group (N:M), or ``None``.
        m: Group size (N:M), or ``None``.
        guard: ``"expected"`` (default), ``"exact"`` or ``"none"``.
        max_cycles: Most swap rounds (default 50).
        update_threshold: Rows whose ``|e|`` is at most this stop (default 0.1).
        variance_power: Power of the input variance dividing the regrowth score (default 1).

    Returns:
        ``(keep, weights)``: the refined mask (same count per row, or per group) and float32 weights.

    Raises:
        ValueError: If ``guard`` is unknown.
        TypeError: If ``guard="exact"`` and ``statistics`` has no Gram matrix.

    Example::

        >>> stats = MomentStatistics(8, torch.device("cpu"))
        >>> stats.update(torch.randn(4, 16, 8) + 1.0, None, num_sequences=4)
        >>> w = torch.randn(3, 8); keep = w.abs() > w.abs().median(dim=1, keepdim=True).values
        >>> new_keep, new_w = dsnot_refine(w, w * keep, keep, stats)
        >>> new_keep.sum(dim=1).tolist() == keep.sum(dim=1).tolist(), bool((new_w[~new_keep] == 0).all())
        (True, True)
    """
    if guard not in _GUARDS:
        raise ValueError(f"DSnoT `guard` must be one of {list(_GUARDS)}, got {guard!r}")
    if guard == "exact" and not isinstance(statistics, GramStatistics):
        raise TypeError("DSnoT with guard='exact' needs GramStatistics (the input Gram matrix) from calibration")
    rows, columns = dense.shape
    device = dense.device
    dense = dense.float()
    current = current.float()
    num_sequences = max(statistics.num_sequences, 1)
    per_sequence_sum = (statistics.sum / num_sequences).to(device)  # (in,)
    tokens_per_sequence = max(statistics.num_tokens, 1) / num_sequences
    variance = statistics.variance.to(device)  # (in,)
    error = dense @ per_sequence_sum - current @ per_sequence_sum  # (out,): e = sum_j dW_j s_j
    initial_sign = torch.sign(error)
    # A row's e never changes sign (a swap that would flip it ends the row), so each row needs one end of each
    # candidate order only: regrow the weights that take most off e, prune first those that add the opposite sign.
    direction = torch.where(error > 0, 1.0, -1.0).unsqueeze(1)  # (out, 1)
    row_index = torch.arange(rows, device=device)
    kept_count = keep.sum(dim=1)
    limit = torch.minimum(columns - kept_count, kept_count)  # (out,): swaps a row can make at most
    k = max(min(max_cycles, columns), 1)
    inf = torch.tensor(math.inf, device=device)
    regrow_scale = per_sequence_sum / variance.clamp_min(1e-12).pow(variance_power)  # (in,)
    grow_list = _first(torch.where(keep, inf, dense * (-direction * regrow_scale)), k)  # (out, k): by -d W_j s_j/var_j
    grown_dense = dense.gather(1, grow_list)
    removed = grown_dense * per_sequence_sum[grow_list]  # (out, k): what each regrowth takes off e
    if guard == "expected":
        grow_cost = grown_dense.square() * variance[grow_list]
    wanda = dense.abs().mul_(statistics.mean_sq_norm.to(device).sqrt())
    if m is None:
        # Kept weights whose signal W_j s_j opposes e's sign, weakest (Wanda score) first, then the others strongest
        # first (a key above every Wanda score, decreasing with it).
        ceiling = 2 * float(wanda.max()) + 1.0
        opposite = (current * (direction * per_sequence_sum)) < 0
        cut_list = _first(torch.where(keep, torch.where(opposite, wanda, ceiling - wanda), inf), k)  # (out, k)
        del opposite
        kept = current.gather(1, cut_list)
        step = kept * per_sequence_sum[cut_list] - removed  # (out, k): change of e per candidate swap
        if guard == "expected":
            dense_cut = dense.gather(1, cut_list)
            step_cost = (dense_cut.square() - (dense_cut - kept).square()) * variance[cut_list] - grow_cost
            del dense_cut
        del kept
    else:
        # Only weights kept by the starting mask may be pruned, each at most once, from the regrown weight's group.
        prunable = torch.where(keep, wanda, inf)
        group_offsets = torch.arange(m, device=device)
    del wanda
    if guard == "exact":
        assert isinstance(statistics, GramStatistics)
        gram = statistics.gram.to(device)
        projected = (dense - current) @ gram  # (out, in): dW G, kept in step for the exact check
        gram_diagonal = torch.diagonal(gram)

    cuts = torch.zeros(rows, k, dtype=torch.long, device=device)  # N:M: the cut chosen in each cycle
    accepted = torch.zeros(rows, k, dtype=torch.bool, device=device)
    active = error.abs() > update_threshold
    for cycle in range(k):
        grow = grow_list[:, cycle]
        if m is None:
            after = error + step[:, cycle]
        else:
            start = grow - grow % m  # (out,)
            cut = start + prunable.gather(1, start.unsqueeze(1) + group_offsets).argmin(dim=1)
            cut_weight = current[row_index, cut]
            after = error + cut_weight * per_sequence_sum[cut] - removed[:, cycle]
            active &= torch.isfinite(prunable[row_index, cut])
        # A row stops once |e| is small, e would change sign, or it runs out of candidates.
        active &= (error.abs() > update_threshold) & (torch.sign(after) == initial_sign) & (limit > cycle)
        if not bool(active.any()):
            break
        accept = active
        if guard == "expected":
            if m is None:
                cost = step_cost[:, cycle]
            else:
                cut_dense = dense[row_index, cut]
                cost = (cut_dense.square() - (cut_dense - cut_weight).square()) * variance[cut] - grow_cost[:, cycle]
            accept = accept & ((after.square() - error.square()) / tokens_per_sequence**2 + cost < 0)
        elif guard == "exact":
            c = cut_list[:, cycle] if m is None else cut
            cut_weight = current[row_index, c]
            grown_delta = grown_dense[:, cycle]
            change = (
                2 * (cut_weight * projected[row_index, c] - grown_delta * projected[row_index, grow])
                + cut_weight.square() * gram_diagonal[c]
                + grown_delta.square() * gram_diagonal[grow]
                - 2 * cut_weight * grown_delta * gram[grow, c]
            )
            accept = accept & (change < 0)
            if bool(accept.any()):
                r, g, c = row_index[accept], grow[accept], c[accept]
                projected[r] += cut_weight[accept].unsqueeze(1) * gram[c] - grown_delta[accept].unsqueeze(1) * gram[g]
        accepted[:, cycle] = accept
        error = torch.where(accept, after, error)
        if m is not None:
            cuts[:, cycle] = cut
            prunable.scatter_(1, cut.unsqueeze(1), torch.where(accept, inf, prunable[row_index, cut]).unsqueeze(1))

    # Each accepted swap regrows one initially pruned weight and prunes one initially kept one (counts, since an N:M
    # row may list the same rejected cut in several cycles).
    accepted_count = accepted.to(torch.int32)
    grown = torch.zeros(rows, columns, dtype=torch.int32, device=device).scatter_add_(1, grow_list, accepted_count) > 0
    cut_off = torch.zeros(rows, columns, dtype=torch.int32, device=device)
    cut_off = cut_off.scatter_add_(1, cut_list if m is None else cuts, accepted_count) > 0
    new_keep = (keep & ~cut_off) | grown
    weights = torch.where(cut_off, 0.0, torch.where(grown, dense, current))
    return new_keep, weights


class DSnoT(Refinement):
    """DSnoT refinement on top of any method's mask (see :func:`dsnot_refine`).

    Args:
        guard: Which swaps DSnoT's rules may make: ``"expected"`` (default: those that lower the expected squared
            output error under DSnoT's independent-feature model; Wanda's calibration cost), ``"exact"`` (those
            that lower the exact reconstruction error, so no layer's error ever grows; needs each layer's input Gram
            matrix, which costs about half of Wanda's time again) or ``"none"`` (all, as the paper's code).
        max_cycles: Most swap rounds per layer (default 50, as the reference code).
        update_threshold: Stop a row once its expected output error is this small (default 0.1).
        variance_power: Power of the input variance in the regrowth score (default 1).

    Example::

        >>> DSnoT().describe()
        'dsnot'
        >>> DSnoT(guard="exact").describe()
        'dsnot (exact guard)'
    """

    name = "dsnot"
    changes_mask = True
    rewrites_weights = False

    def __init__(
        self,
        guard: str = "expected",
        max_cycles: int = 50,
        update_threshold: float = 0.1,
        variance_power: float = 1.0,
    ) -> None:
        if guard not in _GUARDS:
            raise ValueError(f"DSnoT `guard` must be one of {list(_GUARDS)}, got {guard!r}")
        if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 1:
            raise ValueError(f"DSnoT `max_cycles` must be a positive integer, got {max_cycles!r}")
        if not update_threshold >= 0:
            raise ValueError(f"DSnoT `update_threshold` must be >= 0, got {update_threshold!r}")
        self.guard = guard
        self.max_cycles = max_cycles
        self.update_threshold = float(update_threshold)
        self.variance_power = float(variance_power)

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        if self.guard == "exact":
            return GramStatistics(in_features, device)
        return MomentStatistics(in_features, device)

    def refine(
        self,
        dense: Tensor,
        weight: Tensor,
        keep: Tensor,
        statistics: LayerStatistics | None,
        structure: SparsityStructure,
    ) -> Tensor:
        """Refines ``keep`` and writes the refined weights into ``weight`` (in place); returns the new mask."""
        moments = expect_statistics(statistics, MomentStatistics, "DSnoT", "MomentStatistics (or GramStatistics)")
        new_keep, new_weight = dsnot_refine(
            dense,
            weight,
            keep,
            moments,
            structure.n,
            structure.m,
            guard=self.guard,
            max_cycles=self.max_cycles,
            update_threshold=self.update_threshold,
            variance_power=self.variance_power,
        )
        weight.copy_(new_weight)
        return new_keep

    def describe(self) -> str:
        return "dsnot" if self.guard == "expected" else f"dsnot ({self.guard} guard)"

    def __repr__(self) -> str:
        return (
            f"DSnoT(guard={self.guard!r}, max_cycles={self.max_cycles}, update_threshold={self.update_threshold}, "
            f"variance_power={self.variance_power})"
        )
