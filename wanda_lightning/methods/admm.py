"""ADMM weight updates for pruned layers (Boža, "Fast and Effective Weight Update for Pruned Large Language Models",
TMLR 2024): the layer-wise problem solved on the input Gram matrix, as pure torch functions, and the two ways to use
it: the :class:`ADMM` method (mask and weights) and the :class:`ADMMUpdate` refinement (weights for another method's
mask).

For a layer with weights ``W`` (out, in) and calibration inputs ``X`` (tokens, in), pruning with a mask ``M`` asks for
the ``W'`` that minimises ``||X W^T - X (M * W')^T||^2``. Every output row is an independent least-squares problem in
the Gram matrix ``G = X^T X``. The paper solves it with ADMM after preconditioning each input feature ``j`` by its norm
``s_j = sqrt(G_jj)``: on the preconditioned weights ``W s`` the magnitude is Wanda's score, and the preconditioned Gram
matrix ``G / (s s^T)`` has a unit diagonal, so one penalty ``rho`` suits every layer. With a damping ``delta``
(``percdamp`` times the mean diagonal, a pull towards the dense weights), one inverse ``B = (G/(s s^T) + (delta +
rho) I)^-1`` per layer serves every iteration::

    W_hat = W0_hat + rho (Z - U - W0_hat) B     (the least-squares step; W0_hat: preconditioned dense weights)
    W_hat <- a W_hat + (1 - a) Z                (over-relaxation by a = ``relaxation``)
    Z = M * (W_hat + U)                         (projection onto the mask)
    U = U + W_hat - Z                           (scaled dual variable)

The mask is re-selected from ``|W_hat + U|`` during the first ``ramp_iterations`` iterations, at a sparsity that
rises on a cubic ramp to the target (gradual pruning), and kept for the rest. The result is ``Z / s``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core.masks import lowest_mask, n_m_keep_mask
from ..core.statistics import GramStatistics, LayerStatistics, expect_statistics
from ..core.structure import SparsityStructure
from .base import PruningMethod, PruningWarning, Refinement

__all__ = [
    "ADMM",
    "ADMMSystem",
    "ADMMUpdate",
    "admm_iterations",
    "admm_prune",
    "admm_system",
    "admm_update",
    "preconditioner",
]

Selection = Literal["layer", "row"]
_SELECTIONS: tuple[str, ...] = ("layer", "row")
#: Features whose input norm is below this fraction of the layer's mean input norm are preconditioned as if they had
#: that norm: dividing by a (nearly) zero norm would blow their updated weights up.
WEAK_FEATURE_FLOOR = 1e-3


@dataclass(frozen=True)
class ADMMSystem:
    """What the iterations need from one Gram matrix; layers fed the same input (``q``/``k``/``v``) can share it.

    Attributes:
        scale: ``(in,)`` float32 preconditioner ``s``: each input feature's norm ``sqrt(G_jj)``, floored at
            :data:`WEAK_FEATURE_FLOOR` times their mean (1 everywhere when every input is zero).
        inverse: ``(in, in)`` float32 ``(G / (s s^T) + (damping + rho) I)^-1``.
        rho: The ADMM penalty ``inverse`` was made for.
        damping: The damping added to the preconditioned Gram matrix's diagonal.
        weak_features: How many input features got the floor (no, or almost no, calibration signal).
    """

    scale: Tensor
    inverse: Tensor
    rho: float
    damping: float
    weak_features: int


def preconditioner(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Each input feature's norm ``sqrt(G_jj)``, floored at :data:`WEAK_FEATURE_FLOOR` times their mean, and the
    ``(in,)`` bool mask of the floored (weak) features; all ones (and all weak) when every input is zero.

    Example::

        >>> scale, weak = preconditioner(torch.diag(torch.tensor([4.0, 0.0, 9.0])))
        >>> [round(v, 5) for v in scale.tolist()], weak.tolist()
        ([2.0, 0.00167, 3.0], [False, True, False])
    """
    norms = torch.diagonal(gram).float().clamp_min(0.0).sqrt()  # (in,)
    mean_norm = float(norms.mean())
    if mean_norm > 0:
        floor = WEAK_FEATURE_FLOOR * mean_norm
        weak = norms < floor
        return torch.where(weak, torch.full_like(norms, floor), norms), weak
    return torch.ones_like(norms), torch.ones_like(norms, dtype=torch.bool)  # no input ever active


def admm_system(gram: Tensor, *, percdamp: float = 0.1, rho: float = 1.0, retries: int = 3) -> ADMMSystem:
    """Preconditions, damps and inverts a Gram matrix for :func:`admm_iterations`, in float32.

    The damped matrix is symmetric positive definite by construction (a positive semi-definite matrix plus
    ``(damping + rho) I``); should its factorisation still fail (rounding, or a Gram matrix that is not positive
    semi-definite), the damping is multiplied by 10 up to ``retries`` times.

    Args:
        gram: ``(in, in)`` ``X^T X`` (any positive scale).
        percdamp: Damping as a fraction of the preconditioned Gram matrix's mean diagonal.
        rho: ADMM penalty.
        retries: Extra attempts with 10x more damping each.

    Returns:
        The :class:`ADMMSystem`.

    Raises:
        FloatingPointError: If ``gram`` holds NaN or Inf.
        torch.linalg.LinAlgError: If no attempt can be factorised.

    Example::

        >>> system = admm_system(torch.diag(torch.tensor([4.0, 0.0, 9.0])), percdamp=0.0, rho=1.0)
        >>> torch.diagonal(system.inverse).tolist(), system.weak_features
        ([0.5, 1.0, 0.5], 1)
    """
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError("the Gram matrix holds NaN or Inf")
    g = gram.float()
    scale, weak = preconditioner(g)
    preconditioned = g / torch.outer(scale, scale)  # (in, in), diagonal 1 except weak features
    damping = percdamp * float(torch.diagonal(preconditioned).mean())
    shift = 0.0
    for attempt in range(retries + 1):
        preconditioned.diagonal().add_(damping + rho - shift)
        shift = damping + rho
        inverse, info = torch.linalg.inv_ex(preconditioned)
        if int(info) == 0 and bool(torch.isfinite(inverse).all()):
            return ADMMSystem(scale, inverse, float(rho), damping, int(weak.sum()))
        if attempt < retries:
            damping = damping * 10.0 if damping > 0 else max(rho, 1e-3)
    raise torch.linalg.LinAlgError(f"the preconditioned Gram matrix cannot be inverted even with damping {damping:g}")


def _ramp(target: float, step: int, ramp_iterations: int) -> float:
    """Sparsity at iteration ``step`` of a cubic ramp that reaches ``target`` at step ``ramp_iterations - 1``."""
    return target - target * (1.0 - (step + 1) / ramp_iterations) ** 3


def _n_m_keep(magnitude: Tensor, n: int, m: int) -> Tensor:
    """:func:`~wanda_lightning.core.masks.n_m_keep_mask` (ties pruned from the lower column first), by comparing
    every pair in a group: for small ``m`` this avoids a selection per group of ``m`` weights."""
    if m > 16:
        return n_m_keep_mask(magnitude, n, m)
    rows, columns = magnitude.shape
    groups = magnitude.reshape(rows, columns // m, m)  # (out, in / M, M)
    others, own = groups.unsqueeze(-2), groups.unsqueeze(-1)  # (out, G, 1, M), (out, G, M, 1): [i, j] = own i, other j
    earlier = torch.ones(m, m, dtype=torch.bool, device=magnitude.device).tril(-1)  # [i, j]: j < i
    below = (others < own) | ((others == own) & earlier)  # other j goes before own i in the pruning order
    return (below.sum(dim=-1) >= m - n).reshape(rows, columns)


def _select(magnitude: Tensor, fraction: float, target: float, n: int | None, m: int | None, per_row: bool) -> Tensor:
    """Keep mask that prunes the ``fraction`` smallest of ``magnitude`` (per row, or over the whole layer).

    N:M: only weights outside the ``n`` largest of their group are candidates; at ``fraction == target`` all of them
    are pruned, which is the N:M mask itself.
    """
    rows, columns = magnitude.shape
    if m is not None:
        assert n is not None
        final = _n_m_keep(magnitude, n, m)
        if fraction >= target:
            return final
        magnitude = magnitude.masked_fill(final, math.inf)
    if per_row:
        return ~lowest_mask(magnitude, int(columns * fraction))
    return ~lowest_mask(magnitude.reshape(-1), int(magnitude.numel() * fraction)).view(rows, columns)


@torch.no_grad()
def admm_iterations(
    weight: Tensor,
    system: ADMMSystem,
    *,
    keep: Tensor | None = None,
    sparsity: float = 0.5,
    n: int | None = None,
    m: int | None = None,
    iterations: int = 20,
    ramp_iterations: int = 15,
    relaxation: float = 1.0,
    per_row: bool = False,
) -> tuple[Tensor, Tensor]:
    """Runs ADMM on one layer (see the module docstring): with a fixed ``keep`` mask, or selecting the mask.

    Args:
        weight: ``(out, in)`` dense weights (any float dtype; not modified).
        system: :func:`admm_system` of the layer's Gram matrix.
        keep: ``(out, in)`` bool mask to keep fixed; ``None`` selects it (then ``sparsity``, ``n``, ``m`` apply).
        sparsity: Target sparsity (unstructured).
        n: Kept per group (N:M), or ``None``.
        m: Group size (N:M), or ``None``.
        iterations: ADMM iterations.
        ramp_iterations: Iterations (the first ones) that re-select the mask on the cubic ramp; 0 selects it once,
            at the target sparsity, from the preconditioned dense weights (Wanda's scores), and keeps it.
        relaxation: Over-relaxation factor in ``(0, 2)``; 1 is plain ADMM.
        per_row: Rank weights within each output row (every row gets exactly the target); ``False`` ranks the
            unstructured candidates over the whole layer, as the paper does (N:M groups are per row either way).

    Returns:
        ``(new_weight, keep)``: float32 ``(out, in)`` weights with pruned entries exactly 0, and the bool mask.

    Example::

        >>> x, w = torch.randn(256, 16), torch.randn(8, 16)
        >>> new, keep = admm_iterations(w, admm_system(x.t() @ x), sparsity=0.5, per_row=True)
        >>> keep.sum(dim=1).tolist() == [8] * 8, bool((new[~keep] == 0).all())
        (True, True)
    """
    scale = system.scale.to(weight.device)
    inverse = system.inverse.to(weight.device)
    rho, alpha = system.rho, relaxation
    dense = weight.float() * scale  # (out, in): preconditioned dense weights W0_hat
    target = (1.0 - n / m) if (m is not None and n is not None) else sparsity
    mask = keep
    if mask is None and ramp_iterations == 0:
        mask = _select(dense.abs(), target, target, n, m, per_row)
    # The whole state is V = W_hat + U (over-relaxed W_hat). With Z = M * V and U' = (1 - M) * V, one iteration is
    #   V' = a (W0_hat + rho (Z - U' - W0_hat) B) + (1 - a) Z + U' = a W0_hat - a rho (W0_hat - V * S) B + V * C
    # with S = 2 M - 1 and C = 1 - a M: one matrix product and two elementwise passes.
    merged = dense.clone()  # V, starting from W_hat = W0_hat and U = 0
    spare, residual = torch.empty_like(dense), torch.empty_like(dense)
    scaled_dense = dense * alpha
    sign = cross = None
    for step in range(iterations):
        if keep is None and step < ramp_iterations:
            mask = _select(merged.abs(), _ramp(target, step, ramp_iterations), target, n, m, per_row)
            sign = cross = None
        if sign is None or cross is None:
            assert mask is not None
            kept = mask.to(dense.dtype)
            sign, cross = kept * 2 - 1, 1 - alpha * kept
        torch.addcmul(dense, merged, sign, value=-1.0, out=residual)  # W0_hat - (Z - U')
        torch.addmm(scaled_dense, residual, inverse, alpha=-alpha * rho, out=spare)
        merged, spare = spare.addcmul_(merged, cross), merged
    assert mask is not None
    return merged.mul_(mask).div_(scale), mask


def admm_prune(
    weight: Tensor,
    gram: Tensor,
    sparsity: float,
    n: int | None = None,
    m: int | None = None,
    *,
    iterations: int = 20,
    ramp_iterations: int = 15,
    rho: float = 1.0,
    relaxation: float = 1.0,
    percdamp: float = 0.1,
    per_row: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prunes ``weight`` with ADMM and gradual mask selection; returns the float32 weights and the keep mask.

    Example::

        >>> x, w = torch.randn(256, 16), torch.randn(8, 16)
        >>> new, keep = admm_prune(w, x.t() @ x, 0.5, 2, 4)
        >>> keep.view(8, 4, 4).sum(dim=2).unique().tolist(), bool((new[~keep] == 0).all())
        ([2], True)
    """
    system = admm_system(gram, percdamp=percdamp, rho=rho)
    return admm_iterations(
        weight,
        system,
        sparsity=sparsity,
        n=n,
        m=m,
        iterations=iterations,
        ramp_iterations=ramp_iterations,
        relaxation=relaxation,
        per_row=per_row,
    )


def admm_update(
    weight: Tensor,
    gram: Tensor,
    keep: Tensor,
    *,
    iterations: int = 8,
    rho: float = 0.5,
    relaxation: float = 1.8,
    percdamp: float = 0.1,
) -> Tensor:
    """The weights under a fixed ``keep`` mask that best reproduce the dense layer's outputs (ADMM, float32).

    Example::

        >>> x, w = torch.randn(256, 16), torch.randn(8, 16)
        >>> keep = w.abs() > w.abs().median(dim=1, keepdim=True).values
        >>> new = admm_update(w, x.t() @ x, keep)
        >>> error = lambda v: ((w - v) @ x.t()).square().sum()
        >>> bool(error(new) < error(w * keep)), bool((new[~keep] == 0).all())
        (True, True)
    """
    system = admm_system(gram, percdamp=percdamp, rho=rho)
    new_weight, _ = admm_iterations(weight, system, keep=keep, iterations=iterations, relaxation=relaxation)
    return new_weight


class _SystemCache:
    """The last Gram matrix (a copy) and its :class:`ADMMSystem`: layers fed the same input (``q``/``k``/``v``,
    ``gate``/``up``) are pruned one after the other with Gram matrices of identical contents, and share one inverse."""

    def __init__(self) -> None:
        self._gram: Tensor | None = None
        self._system: ADMMSystem | None = None

    def get(self, gram: Tensor, percdamp: float, rho: float) -> ADMMSystem:
        cached = self._gram
        if (
            cached is not None
            and self._system is not None
            and (cached.shape, cached.device) == (gram.shape, gram.device)
            and torch.equal(cached, gram)
        ):
            return self._system
        self.clear()
        system = admm_system(gram, percdamp=percdamp, rho=rho)
        self._gram, self._system = gram.clone(), system
        return system

    def clear(self) -> None:
        self._gram = self._system = None


def _keep_as_many(scores: Tensor, kept: Tensor, n: int | None, m: int | None) -> Tensor:
    """Per row, keep mask of the ``kept[i]`` highest ``scores`` (or the N:M mask): a fallback mask for some rows."""
    if m is not None:
        assert n is not None
        return n_m_keep_mask(scores, n, m)
    order = scores.argsort(dim=1, descending=True, stable=True)  # (rows, in): best first
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return ranks < kept.unsqueeze(1)


def _repair_rows(
    new_weight: Tensor, keep: Tensor, fallback: Tensor, fallback_keep: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, int]:
    """Rows of ``new_weight`` that are not finite once cast to ``dtype`` take ``fallback`` (and its mask)."""
    bad = ~torch.isfinite(new_weight.to(dtype)).all(dim=1)  # (out,)
    count = int(bad.sum())
    if count:
        new_weight[bad] = fallback[bad]
        keep[bad] = fallback_keep[bad]
    return new_weight, keep, count


def _warn_weak(system: ADMMSystem, in_features: int) -> None:
    if system.weak_features:
        warnings.warn(
            f"ADMM: {system.weak_features} of {in_features} input features had (almost) no calibration signal (norm "
            f"below {WEAK_FEATURE_FLOOR:g} x the mean); their weights were updated as if their norm were that floor",
            PruningWarning,
            stacklevel=3,
        )


def _check_options(iterations: int, rho: float, relaxation: float, percdamp: float) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"ADMM `iterations` must be a positive integer, got {iterations!r}")
    for value, name, allowed, ok in (
        (rho, "rho", "a number > 0", lambda v: v > 0),
        (relaxation, "relaxation", "in (0, 2)", lambda v: 0 < v < 2),
        (percdamp, "percdamp", "a number >= 0", lambda v: v >= 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"ADMM `{name}` must be {allowed}, got {value!r}")


def _gram(statistics: LayerStatistics | None, who: str) -> Tensor:
    return expect_statistics(statistics, GramStatistics, who, "GramStatistics (the input Gram matrix)").gram


class ADMM(PruningMethod):
    """ADMM pruning (Boža, TMLR 2024): the mask selected gradually inside ADMM iterations that solve each layer's
    reconstruction problem on its input Gram matrix (see :mod:`~wanda_lightning.methods.admm`).

    Collects each layer's Gram matrix (as SparseGPT does). Per layer: one float32 inverse, then ``iterations``
    matrix products of the weight's size. The defaults are the paper's schedule (20 iterations, the mask ramped over
    the first 15, ``rho`` 1, no over-relaxation): on SmolLM2 they reach the paper's code's perplexity (50 %: 20.86
    against its 20.86; 60 %: 31.17 against 30.91) in about 2 x SparseGPT's time, where 8 iterations with ``rho`` 0.5
    and over-relaxation 1.8 (``ADMM(iterations=8, ramp_iterations=6, rho=0.5, relaxation=1.8)``, the default until now,
    1.0–1.6 x SparseGPT's time) reach a lower layer reconstruction error but 4.7 % and 5.2 % worse perplexity
    (``benchmarks/bench_quality.py``, README "ADMM").

    Numerics: input features without calibration signal are preconditioned with a floor instead of their (near) zero
    norm, rows whose result is not finite in the model's dtype fall back to their dense weights under Wanda's mask,
    and a layer whose system cannot be inverted falls back to Wanda's mask without update; each of these warns
    (:class:`~wanda_lightning.methods.base.PruningWarning`, with the layer's name).

    Args:
        iterations: ADMM iterations per layer (default 20).
        ramp_iterations: The first iterations re-select the mask, at a sparsity rising on a cubic ramp to the
            target (default 15); 0 selects Wanda's mask once and only updates the weights.
        rho: ADMM penalty on the preconditioned problem (default 1).
        relaxation: Over-relaxation factor in ``(0, 2)`` (default 1: plain ADMM).
        percdamp: Damping (a pull towards the dense weights) as a fraction of the preconditioned Gram matrix's mean
            diagonal (default 0.1, as the paper's code).
        selection: ``"layer"`` (default, as the paper) ranks unstructured weights over the whole layer, so rows end up
            with different sparsities; ``"row"`` ranks within each output row (each row exactly at the target). N:M
            groups are per row either way, but their gradual order is ranked as ``selection`` says. Under FSDP2
            (weights split by rows across processes) ``"row"`` is used, with a warning.

    Example::

        >>> ADMM().describe(), ADMM(selection="row").describe()
        ('admm', 'admm (per-row selection)')
    """

    name = "admm"
    rewrites_weights = True

    def __init__(
        self,
        iterations: int = 20,
        ramp_iterations: int = 15,
        rho: float = 1.0,
        relaxation: float = 1.0,
        percdamp: float = 0.1,
        selection: Selection = "layer",
    ) -> None:
        _check_options(iterations, rho, relaxation, percdamp)
        if (
            isinstance(ramp_iterations, bool)
            or not isinstance(ramp_iterations, int)
            or not 0 <= ramp_iterations <= iterations
        ):
            raise ValueError(
                f"ADMM `ramp_iterations` must be an integer from 0 to `iterations`={iterations}, "
                f"got {ramp_iterations!r}"
            )
        if selection not in _SELECTIONS:
            raise ValueError(f"ADMM `selection` must be one of {list(_SELECTIONS)}, got {selection!r}")
        self.iterations = iterations
        self.ramp_iterations = ramp_iterations
        self.rho = float(rho)
        self.relaxation = float(relaxation)
        self.percdamp = float(percdamp)
        self.selection: Selection = selection
        self._cache = _SystemCache()

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return GramStatistics(in_features, device)

    def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
        """The preconditioned magnitude ``|W_ij| s_j`` that ranks the first mask (Wanda's score)."""
        gram = _gram(statistics, "ADMM")
        return weight.float().abs() * preconditioner(gram)[0].to(weight.device).unsqueeze(0)

    def prune_layer(
        self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure, sparsity: float
    ) -> Tensor:
        gram = _gram(statistics, "ADMM")
        if not bool(torch.isfinite(weight).all()):
            raise FloatingPointError("the weight is not finite")
        per_row = self.selection == "row"
        try:
            system = self._cache.get(gram, self.percdamp, self.rho)
        except torch.linalg.LinAlgError as error:
            warnings.warn(
                f"ADMM: {error}; the layer keeps its dense weights under the mask of Wanda's scores",
                PruningWarning,
                stacklevel=2,
            )
            scores = weight.float().abs() * torch.diagonal(gram.float()).clamp_min(0).sqrt().unsqueeze(0)
            keep = _select(scores, sparsity, structure.sparsity, structure.n, structure.m, per_row=True)
            weight.masked_fill_(~keep, 0)
            return keep
        _warn_weak(system, weight.shape[1])
        new_weight, keep = admm_iterations(
            weight,
            system,
            sparsity=sparsity,
            n=structure.n,
            m=structure.m,
            iterations=self.iterations,
            ramp_iterations=self.ramp_iterations,
            relaxation=self.relaxation,
            per_row=per_row,
        )
        dense = weight.float()
        fallback_keep = _keep_as_many(
            dense.abs() * system.scale.to(dense.device), keep.sum(dim=1), structure.n, structure.m
        )
        new_weight, keep, repaired = _repair_rows(new_weight, keep, dense * fallback_keep, fallback_keep, weight.dtype)
        if repaired:
            warnings.warn(
                f"ADMM: the updated weights of {repaired} of {weight.shape[0]} rows are not finite in {weight.dtype}; "
                "those rows keep their dense weights under the mask of Wanda's scores",
                PruningWarning,
                stacklevel=2,
            )
        weight.copy_(new_weight)
        return keep

    def shard_local(self, structure: SparsityStructure) -> bool:
        return self.selection == "row"

    def clear_cache(self) -> None:
        self._cache.clear()

    def for_row_shards(self, structure: SparsityStructure) -> PruningMethod:
        if self.selection == "row":
            return self
        return ADMM(self.iterations, self.ramp_iterations, self.rho, self.relaxation, self.percdamp, selection="row")

    def describe(self) -> str:
        options = [] if self.selection == "layer" else ["per-row selection"]
        defaults = dict(iterations=20, ramp_iterations=15, rho=1.0, relaxation=1.0, percdamp=0.1)
        options += [f"{key}={getattr(self, key):g}" for key, value in defaults.items() if getattr(self, key) != value]
        return f"admm ({', '.join(options)})" if options else "admm"

    def __repr__(self) -> str:
        return (
            f"ADMM(iterations={self.iterations}, ramp_iterations={self.ramp_iterations}, rho={self.rho}, "
            f"relaxation={self.relaxation}, percdamp={self.percdamp}, selection={self.selection!r})"
        )


class ADMMUpdate(Refinement):
    """Optimal weights for the mask another method chose: ADMM on the layer's Gram matrix with the mask fixed
    (:func:`admm_update`), so that ``method="wanda", refine="admm-update"`` is Wanda's mask with updated weights.

    The mask is left as the method chose it; only kept weights change. The same safeguards as :class:`ADMM` apply
    (rows whose result is not finite keep the method's weights; a system that cannot be inverted leaves the layer as
    the method left it), each with a :class:`~wanda_lightning.methods.base.PruningWarning`.

    Args:
        iterations: ADMM iterations per layer (default 8: within about 0.3 % of the exact least-squares optimum on
            SmolLM2's layers).
        rho: ADMM penalty on the preconditioned problem (default 0.5).
        relaxation: Over-relaxation factor in ``(0, 2)`` (default 1.8).
        percdamp: Damping as a fraction of the preconditioned Gram matrix's mean diagonal (default 0.1).

    Example::

        >>> ADMMUpdate().describe()
        'admm-update'
    """

    name = "admm-update"
    changes_mask = False
    rewrites_weights = True

    def __init__(self, iterations: int = 8, rho: float = 0.5, relaxation: float = 1.8, percdamp: float = 0.1) -> None:
        _check_options(iterations, rho, relaxation, percdamp)
        self.iterations = iterations
        self.rho = float(rho)
        self.relaxation = float(relaxation)
        self.percdamp = float(percdamp)
        self._cache = _SystemCache()

    def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
        return GramStatistics(in_features, device)

    def clear_cache(self) -> None:
        self._cache.clear()

    def refine(
        self,
        dense: Tensor,
        weight: Tensor,
        keep: Tensor,
        statistics: LayerStatistics | None,
        structure: SparsityStructure,
    ) -> Tensor:
        """Writes the updated kept weights into ``weight`` (in place); returns ``keep`` unchanged."""
        gram = _gram(statistics, "refine='admm-update'")
        try:
            system = self._cache.get(gram, self.percdamp, self.rho)
        except torch.linalg.LinAlgError as error:
            warnings.warn(f"admm-update: {error}; the layer keeps the method's weights", PruningWarning, stacklevel=2)
            return keep
        _warn_weak(system, weight.shape[1])
        new_weight, _ = admm_iterations(
            dense, system, keep=keep, iterations=self.iterations, relaxation=self.relaxation
        )
        new_weight, _, repaired = _repair_rows(new_weight, keep.clone(), weight.float(), keep, weight.dtype)
        if repaired:
            warnings.warn(
                f"admm-update: the updated weights of {repaired} of {weight.shape[0]} rows are not finite in "
                f"{weight.dtype}; those rows keep the method's weights",
                PruningWarning,
                stacklevel=2,
            )
        weight.copy_(new_weight)
        return keep

    def describe(self) -> str:
        defaults = dict(iterations=8, rho=0.5, relaxation=1.8, percdamp=0.1)
        options = [f"{key}={getattr(self, key):g}" for key, value in defaults.items() if getattr(self, key) != value]
        return f"admm-update ({', '.join(options)})" if options else "admm-update"

    def __repr__(self) -> str:
        return (
            f"ADMMUpdate(iterations={self.iterations}, rho={self.rho}, relaxation={self.relaxation}, "
            f"percdamp={self.percdamp})"
        )
