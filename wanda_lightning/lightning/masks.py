"""Keeping pruned weights at zero while training goes on, and the masks in the callback's checkpointed state.

After pruning, the gradients of pruned weights are zeroed before each optimizer step (before gradient clipping), and
after each step the masks are re-applied and the optimizer states of pruned entries (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``, ...) are zeroed, so sparsity stays exact and pruned entries get no momentum back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..core import find_targets, local_tensor
from ..distributed import kept_from_nonzeros
from ..export import pack_bits, unpack_bits

__all__ = ["MaskKeeper", "pack_mask", "unpack_mask"]

# Masks in callback states of version 1 were packed most significant bit first; version 2 uses the export format's
# packing (least significant bit first).
_REVERSED_BITS = torch.tensor([int(f"{byte:08b}"[::-1], 2) for byte in range(256)], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> dict[str, Any]:
    """A boolean mask as bytes (:func:`~wanda_lightning.export.packing.pack_bits`) plus its shape.

    Example::

        >>> packed = pack_mask(torch.tensor([[True, False, True]]))
        >>> packed["shape"], packed["bits"].tolist()
        ([1, 3], [5])
    """
    return {"shape": list(mask.shape), "bits": pack_bits(mask.detach().to("cpu"))}


def unpack_mask(entry: dict[str, Any], msb_first: bool = False) -> Tensor:
    """Inverse of :func:`pack_mask`; ``msb_first`` reads masks saved by callback states of version 1.

    Example::

        >>> unpack_mask(pack_mask(torch.tensor([[True, False, True]]))).tolist()
        [[True, False, True]]
    """
    shape = tuple(entry["shape"])
    bits = entry["bits"]
    if msb_first:
        bits = _REVERSED_BITS.index_select(0, bits.int())
    return unpack_bits(bits, math.prod(shape)).reshape(shape)


class MaskKeeper:
    """Holds keep masks by parameter name (True where a weight is kept), as pruning made them, and enforces them on
    the module. The callback's state stores the pruned positions (drop bits), as its layout has since version 1.

    Args:
        targets: The callback's target patterns (to read masks back from the weights' zeros).
        ignore: The callback's ignore patterns.
    """

    def __init__(self, targets: Sequence[str] | None, ignore: Sequence[str] | None) -> None:
        self.targets = targets
        self.ignore = ignore
        self.keeps: dict[str, Tensor] | None = None
        #: Under FSDP2 each process holds its own shards' masks only: they are read back from the restored weights'
        #: zeros instead of being saved in the callback's state.
        self.from_weights = False
        self._packed: dict[str, dict[str, Any]] | None = None
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        """Whether there are masks (the model was pruned, or its masks restored)."""
        return self.keeps is not None

    def set(self, keeps: dict[str, Tensor], from_weights: bool) -> None:
        """Replaces the masks (by parameter name, shaped like the parameter or this process's shard of it)."""
        self.keeps = keeps
        self.from_weights = from_weights
        self._packed = None

    def drops(self) -> dict[str, Tensor]:
        """True where a weight is pruned, by parameter name (empty before pruning)."""
        return {name: ~keep for name, keep in (self.keeps or {}).items()}

    # --- enforcing ----------------------------------------------------------------------------------------------------

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks the masks against the module, moves them to its devices, applies them and hooks every optimizer.

        Raises:
            ValueError: If a mask does not fit the module (a checkpoint of another model).
        """
        assert self.keeps is not None
        parameters = dict(pl_module.named_parameters())
        if self.from_weights:
            self.keeps = kept_from_nonzeros(find_targets(pl_module, self.targets, self.ignore)[0])
        for name, keep in list(self.keeps.items()):
            param = parameters.get(name)
            if param is None or tuple(local_tensor(param).shape) != tuple(keep.shape):
                found = "missing" if param is None else f"shape {tuple(local_tensor(param).shape)}"
                raise ValueError(
                    f"the pruning mask of {name!r} (shape {tuple(keep.shape)}) does not fit the module ({found}): the "
                    "checkpoint was made for another model"
                )
            self.keeps[name] = keep.to(param.device)
        self.detach()
        for optimizer in trainer.optimizers:
            self.enforce(pl_module, optimizer)
            self._handles.append(
                optimizer.register_step_post_hook(lambda opt, args, kwargs: self.enforce(pl_module, opt))
            )
        if not trainer.optimizers:
            self.enforce(pl_module, None)

    def detach(self) -> None:
        """Removes the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _masked_parameters(
        self, pl_module: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> list[tuple[nn.Parameter, Tensor]]:
        assert self.keeps is not None
        parameters = dict(pl_module.named_parameters())
        pairs = [(parameters[name], keep) for name, keep in self.keeps.items()]
        if optimizer is None:
            return pairs
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [(param, keep) for param, keep in pairs if id(param) in owned]

    def zero_gradients(self, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zeroes the gradients of pruned weights."""
        if self.keeps is None:
            return
        for param, keep in self._masked_parameters(pl_module, optimizer):
            if param.grad is not None:
                local_tensor(param.grad).masked_fill_(~keep, 0)

    def enforce(self, pl_module: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Re-applies the masks after an optimizer step and zeroes the optimizer state of pruned entries."""
        with torch.no_grad():
            for param, keep in self._masked_parameters(pl_module, optimizer):
                drop = ~keep
                local_tensor(param).masked_fill_(drop, 0)
                state = optimizer.state.get(param) if optimizer is not None else None
                for value in (state or {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        local_tensor(value).masked_fill_(drop, 0)

    # --- state --------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"masks": packed masks or None, "masks_from_weights": bool}``."""
        if self.keeps is not None and self._packed is None and not self.from_weights:
            self._packed = {name: pack_mask(drop) for name, drop in self.drops().items()}
        return {
            "masks": None if self.from_weights else self._packed,
            "masks_from_weights": self.from_weights and self.keeps is not None,
        }

    def load_state_dict(self, state: dict[str, Any], version: int) -> None:
        """Restores what :meth:`state_dict` returned (``version``: the callback state's version)."""
        packed = state.get("masks")
        self._packed = packed if version >= 2 else None
        self.keeps = (
            {name: ~unpack_mask(entry, msb_first=version < 2) for name, entry in packed.items()} if packed else None
        )
        self.from_weights = bool(state.get("masks_from_weights", False))
        if self.from_weights:
            self.keeps = {}  # filled from the restored weights when the masks are attached
