"""``prune_on="checkpoint"``: checkpoints hold pruned weights while the live run trains on dense ones.

Each saved checkpoint's ``state_dict`` gets pruned copies of the affected weights; full checkpoints also keep the dense
ones under the top-level key :data:`DENSE_WEIGHTS_KEY`, which a run resumed with the callback restores, so it goes
on dense. Loaded anywhere else, the checkpoint is the pruned model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from .patches import patch_method, remove_patches

__all__ = [
    "DENSE_WEIGHTS_KEY",
    "put_pruned_weights",
    "restore_dense_weights",
    "temporary_weights",
    "unwrap_saves",
    "wrap_weights_only_saves",
]

DENSE_WEIGHTS_KEY = "wanda_dense_weights"


def put_pruned_weights(checkpoint: dict[str, Any], pruned: Mapping[str, Tensor], keep_dense: bool) -> None:
    """Replaces the weights named in ``pruned`` in ``checkpoint["state_dict"]``; with ``keep_dense`` the dense ones go
    under :data:`DENSE_WEIGHTS_KEY`.

    Raises:
        ValueError: If a pruned parameter is not in the checkpoint's ``state_dict``.
    """
    state = checkpoint["state_dict"]
    dense: dict[str, Tensor] = {}
    for name, tensor in pruned.items():
        if name not in state:
            raise ValueError(f"pruned parameter {name!r} is not in the checkpoint's `state_dict`")
        dense[name] = state[name]
        state[name] = tensor.to(state[name].device)
    if keep_dense:
        checkpoint[DENSE_WEIGHTS_KEY] = dense


def restore_dense_weights(pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> int:
    """Copies the dense weights a checkpoint kept back into the module; returns how many (0 when it kept none).

    Raises:
        ValueError: If they name parameters the module does not have.
    """
    dense = checkpoint.get(DENSE_WEIGHTS_KEY)
    if not dense:
        return 0
    parameters = dict(pl_module.named_parameters())
    missing = sorted(set(dense) - set(parameters))
    if missing:
        raise ValueError(
            f"the checkpoint's `{DENSE_WEIGHTS_KEY}` names parameters the module does not have: {missing[:5]}"
        )
    with torch.no_grad():
        for name, tensor in dense.items():
            parameters[name].copy_(tensor)
    return len(dense)


_SAVES_LABEL = "wanda_weights_only_saves"


def wrap_weights_only_saves(
    pl_module: pl.LightningModule, on_weights_only: Callable[[dict[str, Any]], None]
) -> Callable[[], None]:
    """Wraps the module's ``on_save_checkpoint`` so that weights-only checkpoints, which call no callback hook, go
    through ``on_weights_only`` too; returns the function that undoes exactly this wrapper (see
    :func:`~wanda_lightning.lightning.patches.patch_method`)."""

    def on_save_checkpoint(original: Callable[[dict[str, Any]], None], checkpoint: dict[str, Any]) -> None:
        original(checkpoint)
        if "callbacks" not in checkpoint:  # weights-only: the callbacks' hooks were not called
            on_weights_only(checkpoint)

    return patch_method(pl_module, "on_save_checkpoint", on_save_checkpoint, label=_SAVES_LABEL)


def unwrap_saves(pl_module: pl.LightningModule) -> None:
    """Undoes every :func:`wrap_weights_only_saves` of the module (other patches of ``on_save_checkpoint`` stay)."""
    remove_patches(pl_module, "on_save_checkpoint", _SAVES_LABEL)


@contextmanager
def temporary_weights(parameters: Mapping[str, nn.Parameter]) -> Iterator[dict[str, Tensor]]:
    """For the ``with`` block, each parameter holds a copy of its data, which the block may change (prune, measure);
    the yielded mapping is filled with those copies as the block leaves them, and the live data comes back afterwards,
    never written.

    Example::

        >>> weight = nn.Parameter(torch.ones(2))
        >>> with temporary_weights({"w": weight}) as changed:
        ...     _ = weight.data.zero_()
        >>> weight.tolist(), changed["w"].tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    live = {name: param.data for name, param in parameters.items()}
    changed: dict[str, Tensor] = {}
    for name, param in parameters.items():
        param.data = live[name].clone()
    try:
        yield changed
        changed.update({name: param.data for name, param in parameters.items()})
    finally:
        for name, param in parameters.items():
            param.data = live[name]
