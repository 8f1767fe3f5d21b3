"""Kept so that LightningCLI configs written as ``class_path: wanda_lightning.callback.WandaPruningCallback`` keep
working; the class lives in :mod:`wanda_lightning.lightning.pruning_callback`, and
``wanda_lightning.WandaPruningCallback`` is its canonical name."""

from .lightning.checkpointing import DENSE_WEIGHTS_KEY
from .lightning.pruning_callback import WandaPruningCallback

__all__ = ["DENSE_WEIGHTS_KEY", "WandaPruningCallback"]
