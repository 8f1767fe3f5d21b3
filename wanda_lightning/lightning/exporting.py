"""``export``: what the callbacks write for deployment, on rank zero: a folder (the compact export of a pruned module,
or a plain transformers folder of a shrunk one) and GGUF files for llama.cpp and Ollama."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from ..core import find_pretrained, has_adapters
from ..distributed import holds_shards
from ..export import ExportSummary, merge_adapters, merged_state_dict, save_compressed, save_pruned
from ..gguf import GGUFExport
from .distillation import student_of

__all__ = ["Exports", "export_module"]

ExportTarget = str | GGUFExport
ExportOption = str | GGUFExport | Sequence[str | GGUFExport] | None


@dataclass
class Exports:
    """A callback's ``export`` argument, parsed: at most one folder, and any number of GGUF files.

    Attributes:
        folder: The folder, or ``None``.
        ggufs: The GGUF files (a path ending in ``.gguf`` becomes ``GGUFExport(path)``: q8_0).

    Example::

        >>> Exports.parse(["small/", "small.gguf"]).ggufs[0].dtype
        'q8_0'
    """

    folder: str | None = None
    ggufs: tuple[GGUFExport, ...] = ()
    #: The global step at which the GGUF files were last written (they are not written twice for one model).
    written_at: int | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, export: ExportOption) -> Exports:
        """Raises ``ValueError``/``TypeError`` naming ``export`` for anything but paths and ``GGUFExport`` objects, or
        for two folders."""
        if export is None:
            return cls()
        items = [export] if isinstance(export, (str, os.PathLike, GGUFExport)) else export
        if not isinstance(items, Sequence):
            raise TypeError(
                "`export` must be a folder path, a path ending in .gguf, a GGUFExport or a list of them, got "
                f"{type(export).__name__}"
            )
        folders: list[str] = []
        ggufs: list[GGUFExport] = []
        for item in items:
            if isinstance(item, GGUFExport):
                ggufs.append(item)
            elif isinstance(item, (str, os.PathLike)) and os.fspath(item).lower().endswith(".gguf"):
                ggufs.append(GGUFExport(os.fspath(item)))
            elif isinstance(item, (str, os.PathLike)) and os.fspath(item):
                folders.append(os.fspath(item))
            else:
                raise TypeError(
                    f"`export` items must be folder paths, paths ending in .gguf or GGUFExport objects, got {item!r}"
                )
        if len(folders) > 1:
            raise ValueError(f"`export` names {len(folders)} folders ({folders}); give at most one")
        return cls(folders[0] if folders else None, tuple(ggufs))

    def __bool__(self) -> bool:
        return self.folder is not None or bool(self.ggufs)

    def check_tokenizer(self, pl_module: nn.Module) -> None:
        """Raises ``ValueError`` when a GGUF file would have no vocabulary: neither its ``tokenizer`` nor the module's
        ``tokenizer`` attribute."""
        if any(g.tokenizer is None for g in self.ggufs) and getattr(pl_module, "tokenizer", None) is None:
            raise ValueError(
                "`export` writes a GGUF file, which needs the model's tokenizer: give the module a `tokenizer` "
                "attribute, or pass GGUFExport(path, tokenizer=<the GGUF file or tokenizer folder the model came from>)"
            )

    def write_ggufs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
        """Writes each GGUF file from the module's model on rank zero (PEFT adapters merged on a copy), with the
        module's ``tokenizer`` where a file names none; every process must call it."""
        if not self.ggufs or self.written_at == trainer.global_step:
            return
        self.written_at = trainer.global_step
        if trainer.is_global_zero:
            model, tokenizer = student_of(pl_module), getattr(pl_module, "tokenizer", None)
            if has_adapters(model):  # merged on a copy (pruned entries kept at zero): training may go on
                model = merge_adapters(copy.deepcopy(model))
            for gguf in self.ggufs:
                summary = gguf.save(model, tokenizer)
                rank_zero_info(
                    f"{owner}: wrote {summary.path} ({summary.dtype}, {summary.file_bytes / 2**20:.1f} MiB) for "
                    f"llama.cpp and Ollama"
                )
        trainer.strategy.barrier("wanda_gguf_export")


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
            "`export`: merging PEFT adapters into sharded weights is not supported; export after gathering the "
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
