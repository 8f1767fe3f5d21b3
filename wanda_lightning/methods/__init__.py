"""Mask methods, one module each: what a method collects, how it scores, how it prunes one layer.

- :mod:`.base`: the extension points, :class:`PruningMethod` and :class:`Refinement`;
- :mod:`.wanda`, :mod:`.magnitude`, :mod:`.sparsegpt`, :mod:`.admm`, :mod:`.ria` (with :mod:`.channels`, its N:M
  channel permutation): methods;
- :mod:`.owl`: layer-wise sparsity allocation; :mod:`.dsnot` and :mod:`.admm` (``ADMMUpdate``): refinements;
- :mod:`.registry`: names to objects, for ``prune()``, the callback and the command line.
"""

from .admm import ADMM, ADMMUpdate
from .base import PruningMethod, PruningWarning, Refinement
from .dsnot import DSnoT
from .magnitude import Magnitude
from .owl import OWL
from .registry import (
    ALLOCATIONS,
    REFINEMENTS,
    AllocationName,
    RefinementName,
    available_methods,
    get_allocation,
    get_method,
    get_refinement,
    register_method,
)
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = [
    "ADMM",
    "ALLOCATIONS",
    "OWL",
    "REFINEMENTS",
    "RIA",
    "ADMMUpdate",
    "AllocationName",
    "DSnoT",
    "Magnitude",
    "PruningMethod",
    "PruningWarning",
    "Refinement",
    "RefinementName",
    "SparseGPT",
    "Wanda",
    "available_methods",
    "get_allocation",
    "get_method",
    "get_refinement",
    "register_method",
]
