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
        reconstruction: What block reconstruction ran (see :class:`~wanda_lightning.Reconstruction`), or ``None``.
        reconstruction_seconds: Wall time of training blocks to their dense outputs.
        dense_forward_seconds: Wall time of running the dense blocks over the calibration data (for reconstruction's
            targets): what one dense forward pass through the block stack costs, to compare it with.
        reconstruction_error: Mean over the changed blocks of the relative squared error of their outputs, before and
            after reconstruction; ``None`` without it.
        reconstruction_undone: Blocks whose training made the error worse and was undone.

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
    reconstruction: str | None = None
    reconstruction_seconds: float = 0.0
    dense_forward_seconds: float = 0.0
    reconstruction_error: tuple[float, float] | None = None
    reconstruction_undone: int = 0

    def __post_init__(self) -> None:
        if self.reconstruction_error is not None:  # a list after a JSON round trip
            before, after = self.reconstruction_error
            self.reconstruction_error = (float(before), float(after))

    def reconstruction_lines(self) -> list[tuple[str, str]]:
        """The summary line of block reconstruction (none without it): the error before and after, and its cost
        against a dense forward pass through the blocks.

        Example::

            >>> record = CalibrationRecord(
            ...     reconstruction="block reconstruction (32 steps, lr 0.0001)", reconstruction_seconds=30.0,
            ...     dense_forward_seconds=1.5, reconstruction_error=(0.02, 0.01),
            ... )
            >>> line = record.reconstruction_lines()[0][1]
            >>> "0.0200 -> 0.0100" in line, "30.0 s = 20x a dense forward" in line
            (True, True)
        """
        if self.reconstruction is None or self.reconstruction_error is None:
            return []
        before, after = self.reconstruction_error
        undone = f", {self.reconstruction_undone} undone" if self.reconstruction_undone else ""
        cost = self.reconstruction_seconds / self.dense_forward_seconds if self.dense_forward_seconds > 0 else 0.0
        return [
            (
                "reconstruction",
                f"{self.reconstruction}: output error {before:.4f} -> {after:.4f} (mean of blocks{undone}), "
                f"{self.reconstruction_seconds:.1f} s = {cost:.0f}x a dense forward through the blocks",
            )
        ]
