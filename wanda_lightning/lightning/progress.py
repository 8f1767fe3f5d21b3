"""Progress bars in the style of the trainer's own, for the callbacks' calibration and evaluation passes."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl

__all__ = ["TrainerProgress"]


class TrainerProgress:
    """A progress bar in the style of the trainer's own (Rich or TQDM); silent when the trainer's is off, on other
    ranks, or for custom progress bars."""

    def __init__(self, trainer: pl.Trainer, description: str, total: int | None) -> None:
        self._tqdm: Any = None
        self._rich: Any = None
        self._own_rich = False
        self._task: Any = None
        self._description = description
        self._total = total
        self._bar = trainer.progress_bar_callback

    def __enter__(self) -> TrainerProgress:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        bar = self._bar
        if not isinstance(bar, (RichProgressBar, TQDMProgressBar)) or bar.is_disabled or not self._total:
            return self
        if isinstance(bar, RichProgressBar):
            progress: Any = bar.progress
            if progress is None:
                try:
                    from rich.progress import Progress

                    progress = Progress(transient=True)
                    progress.start()
                    self._own_rich = True
                except Exception:  # another live display is active: stay silent
                    return self
            self._rich = progress
            self._task = progress.add_task(self._description, total=self._total)
        elif isinstance(bar, TQDMProgressBar):
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                total=self._total, desc=self._description, leave=False, dynamic_ncols=True, file=sys.stdout
            )
        return self

    def advance(self) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1)

    def __exit__(self, *exc_info: object) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._rich is not None:
            self._rich.remove_task(self._task)
            if self._own_rich:
                self._rich.stop()
        self._tqdm = self._rich = None
