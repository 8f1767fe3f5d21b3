"""What a calibrated call reports about its calibration, defined once for every report that has one."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CalibrationRecord"]


@dataclass(kw_only=True)
class CalibrationRecord:
    """How a call calibrated and how long it took; :class:`~wanda_lightning.PruningReport` and
    :class:`~wanda_lightning.ShrinkReport` are ones (keyword-only fields, after the report's own).

    Attributes:
        sequential: Whether calibration was block-sequential.
        block_stack: Name of the block stack walked, or ``None``.
        num_samples: Calibration sequences used.
        num_batches: Calibration batches used.
        calibration_seconds: Wall time of forward passes (capture, statistics, propagation).
        scoring_seconds: Wall time of scoring, selection and the changes to the weights.
        total_seconds: Wall time of the whole call.

    Example::

        >>> CalibrationRecord(num_samples=16, num_batches=2).sequential
        False
    """

    sequential: bool = False
    block_stack: str | None = None
    num_samples: int = 0
    num_batches: int = 0
    calibration_seconds: float = 0.0
    scoring_seconds: float = 0.0
    total_seconds: float = 0.0
