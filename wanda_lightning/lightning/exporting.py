"""``export_dir``: rank zero writes the compact export of the pruned module at the end of pruning."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import cast

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from ..core.adapters import has_adapters
from ..core.layers import find_pretrained
from ..distributed.sharding import holds_shards
from ..export import ExportSummary, merge_adapters, save_compressed, save_pruned
from ..export.adapters import merged_state_dict

__all__ = ["export_module"]


def export_module(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    export_dir: str | os.PathLike[str],
    masks: Mapping[str, Tensor] | None = None,
) -> ExportSummary | None:
    """Writes ``pl_module``'s export on rank zero (every process must call it); returns the summary there, ``None``
    elsewhere.

    A module holding one transformers model is exported with :func:`~wanda_lightning.export.save_pruned` (config and
    tokenizer included; the module's ``tokenizer`` attribute if it has one), any other with
    :func:`~wanda_lightning.export.save_compressed` of its state dict. Sharded weights (FSDP) are gathered onto rank
    zero's CPU first, every process taking part. An existing export is replaced.
    """
    try:
        found = find_pretrained(pl_module)
    except TypeError:  # several transformers models: export the module's own state dict
        found = None
    full_state: dict[str, Tensor] | None = None
    hf_state: dict[str, Tensor] | None = None
    adapters = has_adapters(pl_module)
    if adapters and holds_shards(pl_module):
        raise ValueError(
            "`export_dir`: merging PEFT adapters into sharded weights is not supported; export after gathering the "
            "model, or merge with wanda_lightning.merge_adapters on one process"
        )
    if holds_shards(pl_module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_state = cast(dict[str, Tensor], get_model_state_dict(pl_module, options=options))
        if found is not None:
            start = f"{found[1]}." if found[1] else ""
            hf_state = {k.removeprefix(start): v for k, v in full_state.items() if k.startswith(start)}
    summary: ExportSummary | None = None
    if trainer.is_global_zero:
        # Masks come from the zeros of the weights: pruned weights are exactly 0 and the export is bit-exact.
        if found is not None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            hf_model, prefix = found
            if adapters:  # merged on a copy: training may go on with the adapters
                hf_model = merge_adapters(copy.deepcopy(hf_model), _relative(masks, prefix))
            summary = save_pruned(hf_model, export_dir, tokenizer, overwrite=True, state_dict=hf_state)
        else:
            if full_state is not None:
                state = full_state
            elif adapters:
                state = merged_state_dict(pl_module, masks)
            else:
                state = pl_module.state_dict()
            summary = save_compressed(state, export_dir, overwrite=True)
        rank_zero_info(
            f"WandaPruningCallback: exported to {export_dir} ({summary.disk_bytes / 2**20:.1f} MiB on disk; "
            f"pruned weights at {summary.compressed_ratio:.3f}x their dense bytes)"
        )
    trainer.strategy.barrier("wanda_export")
    return summary


def _relative(masks: Mapping[str, Tensor] | None, prefix: str) -> dict[str, Tensor] | None:
    """``masks`` named relative to the submodule ``prefix``."""
    if masks is None:
        return None
    start = f"{prefix}." if prefix else ""
    return {name.removeprefix(start): mask for name, mask in masks.items() if name.startswith(start)}
