"""SparseGPT's solver (Frantar & Alistarh, 2023): mask selection with OBS weight updates, as pure torch functions."""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import _prune_lowest

__all__ = ["inverse_hessian_factor", "sparsegpt_prune"]


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
    for start in range(0, columns, blocksize):
        stop = min(start + blocksize, columns)
        block = w[:, start:stop].clone()  # (out, B)
        errors = torch.zeros_like(block)
        inverse_block = factor[start:stop, start:stop]  # (B, B)
        diagonal = torch.diagonal(inverse_block)  # (B,)
        prune = torch.zeros_like(block, dtype=torch.bool)
        if m is None:
            saliency = block.square() / diagonal.square().unsqueeze(0)
            k = int(saliency.numel() * sparsity)
            prune = _prune_lowest(saliency.reshape(-1), k).reshape(block.shape)
        for i in range(stop - start):
            if m is not None and i % m == 0:
                assert n is not None
                group = block[:, i : i + m].square() / diagonal[i : i + m].square().unsqueeze(0)
                prune[:, i : i + m] = _prune_lowest(group, m - n)
            column_error = block[:, i] * prune[:, i] / diagonal[i]  # (out,)
            # After this update block[:, i] holds its final (kept or zero) value.
            block[:, i:].addr_(column_error, inverse_block[i, i:], alpha=-1.0)
            errors[:, i] = column_error
        block[prune] = 0.0
        w[:, start:stop] = block
        keep[:, start:stop] = ~prune
        if stop < columns:
            w[:, stop:].addmm_(errors, factor[start:stop, stop:], alpha=-1.0)
    return w, keep
