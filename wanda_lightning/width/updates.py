"""What happens to a consumer layer's kept weights when some of its inputs are removed, as pure torch functions.

- ``"bias"`` (FLAP's bias compensation): the removed inputs' mean contribution ``W_:R mean(x_R)`` goes into the bias;
  the kept weights stay.
- ``"least-squares"``: the kept columns (and the bias, where the layer can have one) are refitted to reproduce the
  dense layer's outputs on the calibration inputs, ``min ||W x + b - W'_S x_S - b'||^2`` summed over tokens: the
  structured analogue of SparseGPT's weight update, solved once per layer from the input Gram matrix. It contains the
  bias compensation as a special case (``W'_S = W_S``), so it never does worse on the calibration data.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["UPDATES", "bias_compensation", "least_squares_refit"]

UPDATES = ("none", "bias", "least-squares")


def bias_compensation(weight: Tensor, mean: Tensor, removed: Tensor) -> Tensor:
    """``(out,)`` float32 ``W[:, removed] @ mean[removed]``: what the removed inputs add to the output on average.

    Example::

        >>> bias_compensation(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.5, 1.0]), torch.tensor([1]))
        tensor([2., 4.])
    """
    return weight.float()[:, removed] @ mean.float().to(weight.device)[removed]


def least_squares_refit(
    weight: Tensor,
    gram: Tensor,
    total: Tensor,
    count: int,
    kept: Tensor,
    *,
    fit_bias: bool,
    percdamp: float = 0.01,
    retries: int = 3,
) -> tuple[Tensor, Tensor | None]:
    """Refits the kept input columns (and a bias change) of a linear layer to its dense outputs.

    With ``X`` the calibration inputs (tokens x in) and ``S`` the kept columns, solves
    ``min_{W', c} ||X W^T - X_S W'^T - 1 c^T||^2`` from ``G = X^T X`` and ``s = X^T 1``: the normal equations
    ``[W' c] [[G_SS, s_S], [s_S^T, N]] = W [G_:S, s]`` (without ``c`` when ``fit_bias`` is False: ``W' G_SS = W G_:S``).
    The layer's own bias is unchanged by the problem, so ``c`` is added to it. ``G_SS`` is damped by ``percdamp`` of
    its mean diagonal (10x more, up to ``retries`` times, if it is still not positive definite). Solved in float32.

    Args:
        weight: ``(out, in)`` dense weights.
        gram: ``(in, in)`` ``X^T X``.
        total: ``(in,)`` ``X^T 1``, the per-feature sums.
        count: ``N``, the calibration tokens.
        kept: ``(k,)`` sorted indices of the kept input columns.
        fit_bias: Also fit the constant ``c`` (a bias change).
        percdamp: Damping as a fraction of the mean diagonal of ``G_SS``.
        retries: Extra attempts with 10x more damping.

    Returns:
        ``(new_weight, bias_change)``: ``(out, k)`` float32, and ``(out,)`` float32 or ``None``.

    Raises:
        torch.linalg.LinAlgError: If no attempt can be factorised.

    Example::

        >>> x = torch.randn(64, 3); w = torch.randn(2, 3)
        >>> x[:, 2] = x[:, 0] + x[:, 1]  # the third input is redundant: removing it loses nothing
        >>> new, _ = least_squares_refit(w, x.t() @ x, x.sum(0), 64, torch.tensor([0, 1]), fit_bias=False, percdamp=0)
        >>> torch.allclose(x[:, :2] @ new.t(), x @ w.t(), atol=1e-3)
        True
    """
    w = weight.float()
    g = gram.float().to(w.device)
    s = total.float().to(w.device)
    kept = kept.to(w.device)
    g_ss = g[kept][:, kept]  # (k, k)
    rhs = w @ g[:, kept]  # (out, k)
    size = kept.numel()
    if fit_bias:
        system = torch.zeros(size + 1, size + 1, dtype=torch.float32, device=w.device)
        system[:size, :size] = g_ss
        system[:size, size] = s[kept]
        system[size, :size] = s[kept]
        system[size, size] = float(count)
        rhs = torch.cat([rhs, (w @ s).unsqueeze(1)], dim=1)  # (out, k + 1)
    else:
        system = g_ss.clone()
    diagonal = torch.diagonal(g_ss)
    damp = percdamp * float(diagonal.mean()) if diagonal.numel() else 0.0
    for attempt in range(retries + 1):
        dampened = system.clone()
        dampened.diagonal()[:size] += damp
        factor, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs.t(), factor).t()  # (out, k [+ 1])
            if bool(torch.isfinite(solution).all()):
                if fit_bias:
                    return solution[:, :size].contiguous(), solution[:, size].contiguous()
                return solution, None
        if attempt < retries:
            damp = damp * 10.0 if damp > 0 else 1e-6 * max(float(diagonal.abs().max()), 1.0)
    raise torch.linalg.LinAlgError(f"the kept inputs' Gram matrix cannot be factorised even with damping {damp:g}")
