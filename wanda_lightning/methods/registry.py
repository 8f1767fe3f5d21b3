"""Names of methods, allocations and refinements, and how they resolve to objects.

The names accepted by ``prune()``, the Lightning callback (as ``Literal`` types, so that LightningCLI checks them) and
the command line (as ``choices``) are defined here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from ..core.registry import Registry
from .admm import ADMM, ADMMUpdate
from .base import PruningMethod, Refinement
from .dsnot import DSnoT
from .magnitude import Magnitude
from .owl import OWL
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = [
    "ALLOCATIONS",
    "REFINEMENTS",
    "AllocationName",
    "RefinementName",
    "available_methods",
    "get_allocation",
    "get_method",
    "get_refinement",
    "register_method",
]

AllocationName = Literal["uniform", "owl"]
ALLOCATIONS: tuple[str, ...] = get_args(AllocationName)
RefinementName = Literal["none", "dsnot", "dsnot-expected", "dsnot-exact", "dsnot-unguarded", "admm-update"]
REFINEMENTS: tuple[str, ...] = get_args(RefinementName)

_METHODS: Registry[PruningMethod] = Registry(PruningMethod, "method", "method")


def register_method(name: str, factory: Callable[..., PruningMethod]) -> None:
    """Makes ``method=name`` available to :func:`~wanda_lightning.prune`, the callback and the command line.

    Example::

        class Random(PruningMethod):
            name = "random"
            requires_calibration = False
            def score(self, weight, statistics):
                return torch.rand(weight.shape)

        register_method("random", Random)
        prune(model, None, method="random")
    """
    _METHODS.register(name, factory)


def available_methods() -> list[str]:
    """Registered method names.

    Example::

        >>> "wanda" in available_methods()
        True
    """
    return _METHODS.available()


def get_method(method: str | PruningMethod, **options: object) -> PruningMethod:
    """Resolves a method name (with options for its constructor) or passes an instance through.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
        TypeError: For anything that is neither a string nor a :class:`PruningMethod`.

    Example::

        >>> get_method("wanda", variant=True)
        Wanda(variant=True)
    """
    return _METHODS.get(method, **options)


def get_allocation(allocation: str | OWL | None) -> OWL | None:
    """Resolves ``allocation``: ``None``, one of :data:`ALLOCATIONS` or an :class:`OWL` instance.

    Example::

        >>> get_allocation("owl")
        OWL(m=5.0, lam=0.08)
    """
    if allocation is None or isinstance(allocation, OWL):
        return allocation
    if isinstance(allocation, str) and allocation.lower() in ALLOCATIONS:
        return OWL() if allocation.lower() == "owl" else None
    raise ValueError(f"`allocation` must be one of {list(ALLOCATIONS)} or an OWL instance, got {allocation!r}")


def get_refinement(refine: str | Refinement | None) -> Refinement | None:
    """Resolves ``refine``: ``None``, a :class:`~wanda_lightning.methods.base.Refinement` instance, or one of
    :data:`REFINEMENTS`.

    ``"dsnot"`` is DSnoT with its default guard; ``"dsnot-expected"``, ``"dsnot-exact"`` and ``"dsnot-unguarded"``
    name the guard (``"expected"``, ``"exact"``, ``"none"``); ``"admm-update"`` is :class:`~wanda_lightning.methods.
    admm.ADMMUpdate` (optimal weights for the method's mask).

    Example::

        >>> get_refinement("dsnot-exact")
        DSnoT(guard='exact', max_cycles=50, update_threshold=0.1, variance_power=1.0)
    """
    if refine is None or isinstance(refine, Refinement):
        return refine
    if isinstance(refine, str) and refine.lower() in REFINEMENTS:
        name = refine.lower()
        if name == "none":
            return None
        if name == "admm-update":
            return ADMMUpdate()
        if name == "dsnot":
            return DSnoT()
        guard = name.removeprefix("dsnot-")
        return DSnoT(guard="none" if guard == "unguarded" else guard)
    raise ValueError(f"`refine` must be one of {list(REFINEMENTS)} or a Refinement instance, got {refine!r}")


register_method("wanda", Wanda)
register_method("magnitude", Magnitude)
register_method("sparsegpt", SparseGPT)
register_method("admm", ADMM)
register_method("ria", RIA)
register_method("ria-permuted", lambda **options: RIA(permute_channels=True, **options))
