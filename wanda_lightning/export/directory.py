"""An export directory as a whole: :func:`save_compressed` writes a state dict (staged, then renamed into place),
:func:`load_compressed` reads it back, verifying everything.

Layout of an export directory::

    sparse_manifest.json                   format name and version, one entry per tensor, checksums
    sparse-model.safetensors               every stored tensor (or, above ``max_shard_size``:)
    sparse-model-00001-of-00002.safetensors
    sparse-model.safetensors.index.json    {"metadata": {"total_size": ...}, "weight_map": {key: file}}
    config.json, generation_config.json, tokenizer files   (from :func:`~wanda_lightning.export.save_pruned`)

The tensor files deliberately do not use transformers' names (``model.safetensors``): ``from_pretrained`` on an
export fails with "no file named model.safetensors" instead of silently building a model with random weights.
Only safetensors and JSON are written or read: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .format import (
    DEFAULT_MIN_SPARSITY,
    CorruptExportError,
    check_entry_seal,
    decompress_tensor,
    iter_compressed,
    resolve_aliases,
    seal_entry,
    verified_parts,
)
from .manifest import (
    MANIFEST_NAME,
    ExportSummary,
    Manifest,
    build_manifest,
    manifest_digest,
    read_manifest,
    summarize_export,
)
from .paths import check_destination, fsync_tree, install, parse_size, write_json
from .shards import INDEX_NAME, ShardWriter, check_index, read_shard, tensors_by_file

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "load_compressed", "save_compressed"]

DEFAULT_MAX_SHARD_SIZE = "5GB"


def save_compressed(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    masks: Mapping[str, Tensor] | None = None,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
    progress: bool = False,
) -> ExportSummary:
    """Writes a compressed state dict as an export directory (framework-free; see the module docstring).

    Everything is written to a temporary directory next to ``path`` and renamed into place at the end, so a crash
    never leaves a partial export under ``path``.

    Args:
        state_dict: Name -> tensor, e.g. a Lightning checkpoint's ``"state_dict"``.
        path: The directory to create.
        dtype: Cast floating-point tensors to this dtype; ``None`` keeps each tensor's dtype.
        masks: Optional true keep masks by name (see :func:`~wanda_lightning.export.compress_tensor`).
        min_sparsity: Smallest pruned fraction for which a 2-D floating-point tensor is compressed.
        overwrite: Replace ``path`` if it exists and is not empty.
        max_shard_size: Bytes per safetensors file (``int``, or ``"500MB"``, ``"2GiB"``...); one tensor is never split.
        metadata: JSON-serialisable information stored in the manifest under ``"metadata"``.
        write_extra: Called with the temporary directory to add files (config, tokenizer) before the rename.
        progress: Show a progress bar over tensors.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        ValueError: If ``path`` exists and is not empty (without ``overwrite``), cannot be created, or an argument is
            out of range; nothing is written then.
        TypeError: For arguments of the wrong type.

    Example::

        summary = save_compressed(checkpoint["state_dict"], "export/", dtype=torch.bfloat16)
        state_dict, manifest = load_compressed("export/")
    """
    max_bytes = parse_size(max_shard_size)
    if metadata is not None:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`metadata` must be JSON-serialisable: {error}") from None
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}")
    target = check_destination(path, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        writer = ShardWriter(staging, max_bytes)
        entries: dict[str, dict[str, Any]] = {}
        shard_of: dict[str, int] = {}
        iterator = iter_compressed(state_dict, dtype, masks or {}, min_sparsity)
        for name, _, entry, parts in tqdm(
            iterator, total=len(state_dict), desc="exporting", unit="tensor", disable=not progress, leave=False
        ):
            entries[name] = entry
            if parts:
                keyed = {entry["parts"][role]["key"]: part for role, part in parts.items()}
                shard_of[name] = writer.add(keyed)
        names = writer.finish()
        for name, index in shard_of.items():
            for info in entries[name]["parts"].values():
                info["file"] = names[index]
        for entry in entries.values():
            seal_entry(entry)
        if len(names) > 1:
            weight_map = {key: names[i] for i, keys in enumerate(writer.shards) for key in keys}
            write_json(staging / INDEX_NAME, {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map})
        if write_extra is not None:
            write_extra(staging)
        manifest = build_manifest(entries, names, INDEX_NAME if len(names) > 1 else None, dtype, dict(metadata or {}))
        write_json(staging / MANIFEST_NAME, manifest)
        fsync_tree(staging)
        install(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summarize_export(target)


def _iter_loaded(folder: Path, manifest: Manifest) -> Iterator[tuple[str, Tensor]]:
    check_index(folder, manifest)
    for file_name, names in tensors_by_file(manifest).items():
        if Path(file_name).name != file_name:
            raise CorruptExportError(f"{MANIFEST_NAME}: file name {file_name!r} must not contain a directory")
        stored = read_shard(folder / file_name, names, manifest)
        for name in names:
            entry = manifest["tensors"][name]
            parts = verified_parts(name, entry, stored)
            tensor = decompress_tensor(name, parts, entry)
            check_entry_seal(name, entry)
            yield name, tensor
        del stored


def load_compressed(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> tuple[dict[str, Tensor], Manifest]:
    """Reads an export back into a state dict, verifying everything (see :func:`save_compressed`).

    Checks, in order: the manifest's format and version; the index; each file's header against its size (a truncated
    file names the tensor cut off); each stored part's dtype, shape and SHA-256; mask popcounts and N:M codes against
    the kept counts; aliases against their targets; and finally the manifest's own checksum.

    Args:
        path: An export directory.
        device: Where the tensors go; ``None`` keeps them on the CPU.

    Returns:
        ``(state_dict, manifest)``; tied names share one tensor.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is not an export; :class:`CorruptExportError` (a ``ValueError``) naming the tensor or file
            if anything fails verification.

    Example::

        state_dict, manifest = load_compressed("export/")
        lightning_module.load_state_dict(state_dict)
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    out: dict[str, Tensor] = {}
    for name, tensor in _iter_loaded(folder, manifest):
        out[name] = tensor if device is None else tensor.to(device)
    state = resolve_aliases(out, manifest["tensors"])
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CorruptExportError(
            f"{MANIFEST_NAME} in {str(folder)!r} does not match its own checksum `manifest_sha256`: it was edited "
            "after the export was written"
        )
    return state, manifest
