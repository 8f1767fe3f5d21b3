"""SparseGPT (Frantar & Alistarh, 2023): mask selection with OBS weight updates; the solver as pure torch functions and
the :class:`SparseGPT` method that runs it on each layer."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.masks import lowest_mask
from ..core.statistics import GramStatistics, LayerStatistics, expect_statistics
from ..core.structure import SparsityStructure
from .base import PruningMethod

__all__ = ["SparseGPT", "inverse_hessian_factor", "sparsegpt_prune"]

_INNER = 16  # columns per rank-1-update sub-block inside a lazy-update block


def inverse_hessian_factor(hessian: Tensor, percdamp: float = 0.01, retries: int = 3) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the mask of dead input features.

    Features no calibration token activated (zero diagonal) get a unit diagonal. ``percdamp`` times the mean diagonal
    is added; if the matrix is still not positive definite, the dampening is multiplied by 10 up to ``retries`` times.

    Args:
        hessian: ``(in, in)`` float32 ``sum_t x_t x_t^T`` (any positive scale).
        percdamp: Dampening as a fraction of the mean diagonal.
        retries: Extra attempts with 10x more dampening each.

    Returns:
        ``(factor, dead)``: ``(in, in)`` upper-triangular ``U`` with ``U^T U = (H + damp I)^-1``, and ``(in,)`` bool.

    Raises:
        torch.linalg.LinAlgError: If no attempt gives a positive definite matrix.

    Example::

        >>> factor, dead = inverse_hessian_factor(torch.eye(3) * 4)
        >>> torch.allclose(factor, torch.eye(3) / (4.04 ** 0.5)), dead.any().item()
        (True, False)
    """
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean_diagonal = torch.diagonal(h).mean()
    damp = percdamp
    for attempt in range(retries + 1):
        dampened = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return factor, dead
        if attempt < retries:
            damp *= 10.0
    raise torch.linalg.LinAlgError(
        f"the Hessian is not positive definite even with dampening {damp:g} x its mean diagonal"
    )


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    n: int | None = None,
    m: int | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prunes ``weight`` with SparseGPT and returns the updated weight and the keep mask.

    Columns are processed in blocks of ``blocksize``. Unstructured: in each block, the
    ``floor(rows x block_columns x sparsity)`` weights with the lowest ``w^2 / [H^-1]_jj^2`` over the whole block are
    pruned (SparseGPT's adaptive mask). N:M: in each group of ``m`` columns the ``m - n`` lowest of each row, chosen
    when the solver reaches the group. Every pruned weight's error is compensated on the columns after it (OBS update).

    Args:
        weight: ``(out, in)`` weight (any float dtype; not modified).
        hessian: ``(in, in)`` float32 input Gram matrix.
        sparsity: Target sparsity (unstructured).
        n: Kept per group (N:M), or ``None``.
        m: Group size (N:M), or ``None``.
        blocksize: Columns per lazy-update block.
        percdamp: Dampening as a fraction of the mean Hessian diagonal.

    Returns:
        ``(new_weight, keep)``: float32 ``(out, in)`` weights with pruned entries exactly 0, and the bool keep mask.

    Example::

        >>> w, x = torch.randn(8, 16), torch.randn(64, 16)
        >>> new, keep = sparsegpt_prune(w, x.t() @ x, 0.5)
        >>> (new[~keep] == 0).all().item(), keep.sum().item()
        (True, 64)
    """
    rows, columns = weight.shape
    w = weight.float().clone()  # (out, in)
    factor, dead = inverse_hessian_factor(hessian.float(), percdamp)
    w[:, dead] = 0
    keep = torch.ones(rows, columns, dtype=torch.bool, device=w.device)
    # Rank-1 updates touch only a sub-block of `inner` columns (a multiple of M, so N:M groups never straddle one);
    # each finished sub-block updates the rest of its block with one matrix product.
    inner = _INNER if m is None else m * max(1, _INNER // m)
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        count = stop - start
        block = w[:, start:stop].t().contiguous()  # (B, out): row i is weight column start + i
        errors = torch.empty_like(block)  # (B, out)
        inverse_block = factor[start:stop, start:stop]  # (B, B)
        diagonal = torch.diagonal(inverse_block)  # (B,)
        if m is None:
            saliency = block.t().square() / diagonal.square()  # (out, B)
            k = int(saliency.numel() * sparsity)
            prune = lowest_mask(saliency.reshape(-1), k).reshape(saliency.shape).t()  # (B, out)
            scale = prune / diagonal.unsqueeze(1)  # (B, out): 1 / [H^-1]_ii where pruned, else 0
        else:
            prune = torch.zeros_like(block, dtype=torch.bool)
            scale = torch.zeros_like(block)
        for sub in range(0, count, inner):
            sub_stop = min(sub + inner, count)
            for i in range(sub, sub_stop):
                if m is not None and i % m == 0:
                    assert n is not None
                    group = block[i : i + m].t().square() / diagonal[i : i + m].square()  # (out, M)
                    prune[i : i + m] = lowest_mask(group, m - n).t()
                    scale[i : i + m] = prune[i : i + m] / diagonal[i : i + m].unsqueeze(1)
                torch.mul(block[i], scale[i], out=errors[i])  # (out,)
                # After this update block[i] holds its final (kept or zero) value.
                block[i:sub_stop].addr_(inverse_block[i, i:sub_stop], errors[i], alpha=-1.0)
            if sub_stop < count:
                block[sub_stop:].addmm_(inverse_block[sub:sub_stop, sub_stop:].t(), errors[sub:sub_stop], alpha=-1.0)
        block[prune] = 0.0
        w[:, start:stop] = block.t()
        keep[:, start:stop] = ~prune.t()
        if stop < columns:
            w[:, stop:].addmm_(errors.t(), factor[start:stop, stop:], alpha=-1.0)
    return w, keep


class SparseGPT(PruningMethod):
    """SparseGPT (Frantar & Alistarh, 2023): adaptive mask selection with OBS updates of the kept weights.

    Collects each layer's input Gram matrix (float32, freed with the layer's statistics once the layer is pruned),
    dampens it by ``percdamp`` of its mean diagonal (10x more, up to 3 times, if it is still singular) and runs the
    blocked solver of :func:`~wanda_lightning.methods.sparsegpt.sparsegpt_prune`.

    Args:
        blocksize: Columns per lazy-update block (default 128).
        percdamp: Dampening as a fraction of the mean Hessian diagonal (default 0.01).

    Example::

        >>> SparseGPT().describe()
        'sparsegpt'
    """

    name = "sparsegpt"
    rewrites_weights = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"`blocksize` must be a positive integer, got {blocksize!r}")
        if not 0.0 < percdamp < 1.0:
            raise ValueError(f"`percdamp` must be in (0, 1), got {percdamp!r}")
        self.blocksize = blocksize
        self.percdamp = percdamp

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return GramStatistics(in_features, device)

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        """SparseGPT's saliency before any update: ``w^2 / [H^-1]_jj^2``."""
        gram = expect_statistics(statistics, GramStatistics, "SparseGPT").gram
        factor, _ = inverse_hessian_factor(gram, self.percdamp)
        return weight.float().square() / torch.diagonal(factor).square().unsqueeze(0)

    def prune_layer(
        self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure, sparsity: float
    ) -> Tensor:
        gram = expect_statistics(statistics, GramStatistics, "SparseGPT").gram
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError("the weight is not finite")
        new_weight, keep = sparsegpt_prune(
            weight,
            gram,
            sparsity,
            structure.n,
            structure.m,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
        )
        weight.copy_(new_weight)
        return keep

    def shard_local(self, structure: SparsityStructure) -> bool:
        # Rows are updated independently, but the unstructured mask is chosen over all rows of each column block.
        return structure.is_n_m

    def __repr__(self) -> str:
        return f"SparseGPT(blocksize={self.blocksize}, percdamp={self.percdamp})"
