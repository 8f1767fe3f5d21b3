"""Tensor files of an export: safetensors shards written under a size limit, read back through the ``safetensors``
package and checked against the manifest (a damaged file names the tensors it holds)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .format import CorruptExportError

__all__ = ["INDEX_NAME", "WEIGHTS_NAME", "ShardWriter", "check_index", "read_shard", "tensors_by_file"]

WEIGHTS_NAME = "sparse-model.safetensors"
INDEX_NAME = "sparse-model.safetensors.index.json"


class ShardWriter:
    """Accumulates stored tensors and writes a shard whenever the next tensor would pass the size limit."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # storage keys per written shard
        self.total_bytes = 0

    def add(self, parts: Mapping[str, Tensor]) -> int:
        """Queues one tensor's parts (kept in one shard); returns the index of the shard they go to."""
        size = sum(p.numel() * p.element_size() for p in parts.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        for key, part in parts.items():
            self.pending[key] = part.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        return len(self.shards)

    def flush(self) -> None:
        if not self.pending:
            return
        index = len(self.shards)
        save_file(self.pending, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Writes the last shard and renames all to their final names; returns them in order."""
        self.flush()
        if not self.shards:
            save_file({}, str(self.folder / "shard-0.tmp"), metadata={"format": "pt"})
            self.shards.append([])
        count = len(self.shards)
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        names = [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        if count == 1:
            names = [WEIGHTS_NAME]
        for index, name in enumerate(names):
            os.replace(self.folder / f"shard-{index}.tmp", self.folder / name)
        return names


def tensors_by_file(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    by_file: dict[str, list[str]] = {name: [] for name in manifest["files"]}
    for name, entry in manifest["tensors"].items():
        if not isinstance(entry, dict):
            raise CorruptExportError(f"tensor {name!r}: manifest entry must be an object")
        if entry.get("layout") == "alias":
            continue
        parts = entry.get("parts")
        files = {p.get("file") for p in parts.values() if isinstance(p, dict)} if isinstance(parts, dict) else set()
        file = next(iter(files)) if len(files) == 1 else None
        if not isinstance(file, str) or file not in by_file:
            raise CorruptExportError(
                f"tensor {name!r}: its parts must lie in one of the export's files {manifest['files']}, got "
                f"{sorted(map(str, files))}"
            )
        by_file[file].append(name)
    return by_file


def check_index(folder: Path, manifest: Mapping[str, Any]) -> None:
    index_name = manifest.get("index")
    if index_name is None:
        return
    try:
        index = json.loads((folder / str(index_name)).read_text())
        weight_map = index["weight_map"]
    except FileNotFoundError:
        raise CorruptExportError(f"index file {index_name!r} is missing from {str(folder)!r}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptExportError(f"index file {index_name!r} is not valid: {error}") from None
    for name, entry in manifest["tensors"].items():
        for info in (entry.get("parts") or {}).values():
            if weight_map.get(info.get("key")) != info.get("file"):
                raise CorruptExportError(
                    f"tensor {name!r}: index file {index_name!r} maps {info.get('key')!r} to "
                    f"{weight_map.get(info.get('key'))!r}, the manifest to {info.get('file')!r}"
                )


def read_shard(file: Path, names: list[str], manifest: Mapping[str, Any]) -> dict[str, Tensor]:
    """Loads the stored parts of ``names`` from one safetensors file, refusing a file that holds other keys or lacks
    one; a file the ``safetensors`` package cannot read is diagnosed to name the tensors concerned."""
    key_owner = {info["key"]: name for name in names for info in manifest["tensors"][name]["parts"].values()}
    held = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
    if not file.is_file():
        raise CorruptExportError(f"file {file.name!r} is missing; it holds tensor(s) {held}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                if key not in key_owner:
                    raise CorruptExportError(
                        f"file {file.name!r} stores {key!r}, which is not described by the manifest"
                    )
            missing = sorted(set(key_owner) - set(keys))
            if missing:
                raise CorruptExportError(
                    f"tensor {key_owner[missing[0]]!r}: {missing[0]!r} is missing from {file.name!r}"
                )
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, RuntimeError, ValueError, OSError) as error:
        if isinstance(error, CorruptExportError):
            raise
        raise _diagnose(file, key_owner, held, error) from None


def _diagnose(file: Path, key_owner: Mapping[str, str], held: str, error: Exception) -> CorruptExportError:
    """Why ``safetensors`` refused ``file``: the header's own byte ranges against the file's size name a truncated
    tensor; anything else names the file and what it holds."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        header_size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if header_size is None or 8 + header_size > size:
            return CorruptExportError(f"file {file.name!r} is truncated inside its header; it holds tensor(s) {held}")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as decode_error:
            return CorruptExportError(
                f"file {file.name!r} has a corrupted header ({decode_error}); it holds tensor(s) {held}"
            )
    data_size = size - 8 - header_size
    for key, info in header.items() if isinstance(header, dict) else ():
        stop = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if key != "__metadata__" and isinstance(stop, int) and stop > data_size:
            return CorruptExportError(
                f"tensor {key_owner.get(key, key)!r}: file {file.name!r} is truncated ({key!r} needs bytes up to "
                f"{stop} "
                f"of the data, the file holds {data_size})"
            )
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CorruptExportError(f"file {file.name!r} cannot be read ({first}); it holds tensor(s) {held}")
