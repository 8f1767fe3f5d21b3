"""What a pruning run does, validated once: :class:`PruneConfig`, shared by ``prune()``, the callback and the CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.options import CalibrationOptions, options_or_default
from ..core.reconstruction import Reconstruction
from ..core.structure import SparsityStructure, parse_structure
from ..core.targets import validate_patterns
from ..methods.base import PruningMethod, Refinement
from ..methods.owl import OWL
from ..methods.registry import REFINEMENTS, get_allocation, get_method, get_refinement

__all__ = ["PruneConfig"]


@dataclass(frozen=True)
class PruneConfig:
    """A validated pruning configuration: everything about a run that does not depend on the model.

    Build it with :meth:`create`, which checks every argument and raises before anything is touched; the fields
    then hold resolved objects (a :class:`~wanda_lightning.core.structure.SparsityStructure`, a method instance, ...).
    See :func:`~wanda_lightning.prune` for what each argument means; how calibration runs is ``options`` (a
    :class:`~wanda_lightning.core.options.CalibrationOptions`, checked when it was made).

    Example::

        >>> config = PruneConfig.create(structure="2:4", method="sparsegpt", options=CalibrationOptions(num_samples=64))
        >>> config.structure.sparsity, config.method.describe(), config.needs_data, config.options.num_samples
        (0.5, 'sparsegpt', True, 64)
    """

    structure: SparsityStructure
    method: PruningMethod
    allocation: OWL | None = None
    refinement: Refinement | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    checkpoint: Path | None = None
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    reconstruction: Reconstruction | None = None

    @classmethod
    def create(
        cls,
        *,
        method: str | PruningMethod = "wanda",
        sparsity: float | None = None,
        structure: str = "unstructured",
        allocation: str | OWL | None = None,
        refine: str | Refinement | Reconstruction | None = None,
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        options: CalibrationOptions | None = None,
    ) -> PruneConfig:
        """Checks and resolves every argument; ``options`` defaults to ``CalibrationOptions()``.

        Raises:
            ValueError, TypeError: Naming the argument, the value and what is allowed.
        """
        parsed = parse_structure(structure, sparsity)
        pruning_method = get_method(method)
        owl = get_allocation(allocation)
        reconstruction = Reconstruction() if refine == "reconstruct" else refine
        reconstructs = isinstance(reconstruction, Reconstruction)
        try:
            refinement = None if reconstructs else get_refinement(refine)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(
                f"`refine` must be one of {[*REFINEMENTS, 'reconstruct']}, a Refinement or a Reconstruction, got "
                f"{refine!r}"
            ) from None
        calibration = options_or_default(options)
        if reconstructs and not calibration.sequential:
            raise ValueError(
                f"`refine`={refine!r} trains block by block, and sequential=False calibrates the whole model in one "
                "pass: use sequential=True, or another `refine`"
            )
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"`checkpoint` must be a path to a .safetensors file or folder, got {checkpoint!r}")
        if owl is not None and parsed.is_n_m:
            raise ValueError(
                f"`allocation`='owl' gives blocks different sparsities, which `structure`={parsed.name!r} fixes at "
                f"{parsed.sparsity:g} for every group of {parsed.m}; use structure='unstructured' with OWL"
            )
        if pruning_method.permute_channels and not parsed.is_n_m:
            raise ValueError(
                f"`method`={pruning_method.describe()!r} permutes input channels to form better N:M groups, which "
                f"`structure`={parsed.name!r} does not have; use an N:M structure such as '2:4', or method='ria'"
            )
        return cls(
            structure=parsed,
            method=pruning_method,
            allocation=owl,
            refinement=refinement,
            targets=validate_patterns(targets, "targets"),
            ignore=validate_patterns(ignore, "ignore"),
            checkpoint=Path(checkpoint) if checkpoint is not None else None,
            options=calibration,
            reconstruction=reconstruction if isinstance(reconstruction, Reconstruction) else None,
        )

    @property
    def needs_data(self) -> bool:
        """Whether calibration batches are needed (by the method, the allocation or the refinement)."""
        return (
            self.method.requires_calibration
            or self.allocation is not None
            or self.refinement is not None
            or self.reconstruction is not None
        )

    def requirements(self) -> list[str]:
        """What needs calibration data, for messages: ``["sparsegpt", "owl (M=5, lambda=0.08)"]``."""
        wanted = [self.method.describe()] if self.method.requires_calibration else []
        return wanted + [x.describe() for x in (self.allocation, self.refinement, self.reconstruction) if x is not None]

    def with_batches_as_given(self) -> PruneConfig:
        """A copy that uses calibration batches as they come (no ``num_samples`` bound, no re-batching): for callers
        that prepared the batches themselves."""
        return replace(self, options=self.options.with_batches_as_given())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (methods by their :meth:`~wanda_lightning.PruningMethod.describe` names)."""
        return {
            "sparsity": self.structure.sparsity,
            "structure": self.structure.name,
            "method": self.method.describe(),
            "allocation": self.allocation.describe() if self.allocation is not None else None,
            "refinement": self.refinement.describe() if self.refinement is not None else None,
            "reconstruction": self.reconstruction.describe() if self.reconstruction is not None else None,
            "targets": list(self.targets) if self.targets is not None else None,
            "ignore": list(self.ignore) if self.ignore is not None else None,
            "sequential": self.options.sequential,
            "blocks": self.options.blocks,
            "num_samples": self.options.num_samples,
            "batch_size": self.options.batch_size,
        }
