"""Loading and continuing shrunk models in Lightning: checkpoints hold the new shapes, so the module built at its
original size is resized to the checkpoint before its weights are loaded. Blocks removed by depth pruning are named
in the checkpoint (:data:`REMOVED_BLOCKS_KEY`, written by the callback), so the same blocks go, whatever each
computes differently (a sliding-window block stays one)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
from torch import Tensor, nn

from ..core import BlockStack, find_pretrained
from ..depth import remove_blocks
from ..width import fit_to_state_dict, sync_config
from .patches import patch_method, remove_patches

__all__ = [
    "REMOVED_BLOCKS_KEY",
    "fit_module_to_checkpoint",
    "load_shrunk_checkpoint",
    "removed_blocks_of",
    "unwrap_loads",
    "wrap_loads",
]

#: Checkpoint entry ``{stack name: [removed block indices]}`` (indices into the stack as the module is built).
REMOVED_BLOCKS_KEY = "wanda_removed_blocks"

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)

_LOADS_LABEL = "wanda_shrunk_loads"


def removed_blocks_of(checkpoint: Mapping[str, Any]) -> dict[str, list[int]]:
    """The blocks depth pruning removed, as the checkpoint names them (empty when none were)."""
    found = checkpoint.get(REMOVED_BLOCKS_KEY) or {}
    return {str(name): [int(i) for i in indices] for name, indices in found.items()}


def fit_module_to_checkpoint(
    module: nn.Module, state_dict: Mapping[str, Tensor], removed_blocks: Mapping[str, list[int]] | None = None
) -> list[str]:
    """Removes ``removed_blocks`` (``{stack name: indices}``) from ``module`` where it still has them, resizes its
    layers to ``state_dict``'s shapes and rewrites the config of the transformers model it holds to match; returns
    the resized layers' names."""
    try:
        found = find_pretrained(module)
    except TypeError:
        found = None
    config = found[0].config if found is not None else None
    for name, indices in (removed_blocks or {}).items():
        blocks = list(module.get_submodule(name).children())
        saved = {key[len(name) + 1 :].split(".", 1)[0] for key in state_dict if key.startswith(f"{name}.")}
        if len(blocks) == len(saved) + len(indices):  # not yet removed from this module
            remove_blocks(module, BlockStack(name, blocks), indices, config)
    resized = fit_to_state_dict(module, state_dict)
    if resized and found is not None:
        sync_config(found[0])
    return resized


def wrap_loads(
    pl_module: pl.LightningModule, before_resize: Callable[[dict[str, Any]], None] | None = None
) -> Callable[[], None]:
    """Makes ``pl_module.on_load_checkpoint`` resize the module to the checkpoint first (Lightning calls it before it
    loads the state dict, when resuming with ``Trainer.fit(ckpt_path=...)``); ``before_resize(checkpoint)`` runs just
    before, on the module as it was built. Returns the function that undoes exactly this wrapper (see
    :func:`~wanda_lightning.lightning.patches.patch_method`)."""

    def on_load_checkpoint(original: Callable[[dict[str, Any]], None], checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, Mapping):
            if before_resize is not None:
                before_resize(checkpoint)
            fit_module_to_checkpoint(pl_module, state, removed_blocks_of(checkpoint))
        original(checkpoint)

    return patch_method(pl_module, "on_load_checkpoint", on_load_checkpoint, label=_LOADS_LABEL)


def unwrap_loads(pl_module: pl.LightningModule) -> None:
    """Undoes every :func:`wrap_loads` of the module (other patches of ``on_load_checkpoint`` stay)."""
    remove_patches(pl_module, "on_load_checkpoint", _LOADS_LABEL)


def load_shrunk_checkpoint(cls: type[ModuleT], checkpoint_path: str | os.PathLike[str], **kwargs: Any) -> ModuleT:
    """``cls.load_from_checkpoint(checkpoint_path, **kwargs)`` for a checkpoint of a shrunk model (widths or depth).

    A plain ``load_from_checkpoint`` builds the module at its original size from the saved hyperparameters and
    fails on the checkpoint's smaller shapes; this resizes the module to the checkpoint (and rewrites the transformers
    config it holds) before the weights are loaded, with everything else as ``load_from_checkpoint`` does it
    (``map_location``, ``strict``, hyperparameter overrides).

    Example::

        module = load_shrunk_checkpoint(CausalLMModule, "checkpoints/last.ckpt")
        module.model.save_pretrained("small/")  # stock from_pretrained loads it
    """
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"`cls` must be a LightningModule class, got {cls!r}")

    def on_load_checkpoint(self: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, Mapping):
            fit_module_to_checkpoint(self, state, removed_blocks_of(checkpoint))
        cls.on_load_checkpoint(self, checkpoint)

    # A subclass only for loading: the instance gets its own class back before it is returned.
    loader = cast(type[ModuleT], type(cls.__name__, (cls,), {"on_load_checkpoint": on_load_checkpoint}))
    module = loader.load_from_checkpoint(os.fspath(checkpoint_path), **kwargs)
    module.__class__ = cls
    return cast(ModuleT, module)
