"""The on-disk half of the export format: sharded safetensors, a JSON manifest, atomic directory writes.

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

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .format import (
    DEFAULT_MIN_SPARSITY,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_SEPARATOR,
    CorruptExportError,
    _check_seal,
    _iter_compressed,
    _resolve_aliases,
    _seal,
    _verified_parts,
    decompress_tensor,
    dtype_from_name,
    dtype_name,
)
from .packing import BIT_ORDER

__all__ = [
    "INDEX_NAME",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "ExportSummary",
    "compress_checkpoint",
    "is_export",
    "load_compressed",
    "read_checkpoint",
    "read_manifest",
    "save_compressed",
    "summarize_export",
]

MANIFEST_NAME = "sparse_manifest.json"
WEIGHTS_NAME = "sparse-model.safetensors"
INDEX_NAME = "sparse-model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_UNITS["TIB"] = 2**40


@dataclass
class ExportSummary:
    """What an export holds and how big it is.

    Attributes:
        path: The export directory.
        files: Every file in it, relative to ``path``.
        num_tensors: Tensors in the manifest (aliases included).
        num_compressed: Tensors stored as kept values + mask or N:M codes.
        num_aliases: Tensors stored once for several names (tied embeddings).
        dense_bytes: ``numel x dtype size`` over stored tensors (aliases once): the size of a dense save.
        stored_bytes: Bytes of tensor data actually stored.
        compressed_dense_bytes: ``dense_bytes`` restricted to the compressed tensors.
        compressed_stored_bytes: ``stored_bytes`` restricted to the compressed tensors.
        disk_bytes: Size of all files in the directory.

    Example::

        >>> ExportSummary(path="out", compressed_dense_bytes=200, compressed_stored_bytes=113).compressed_ratio
        0.565
    """

    path: str
    files: list[str] = field(default_factory=list)
    num_tensors: int = 0
    num_compressed: int = 0
    num_aliases: int = 0
    dense_bytes: int = 0
    stored_bytes: int = 0
    compressed_dense_bytes: int = 0
    compressed_stored_bytes: int = 0
    disk_bytes: int = 0

    @property
    def compressed_ratio(self) -> float:
        """Stored over dense bytes of the compressed (pruned) tensors; 1.0 when none was compressed."""
        return self.compressed_stored_bytes / self.compressed_dense_bytes if self.compressed_dense_bytes else 1.0

    @property
    def ratio(self) -> float:
        """Stored over dense bytes of all tensors."""
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary, ratios included."""
        return {**asdict(self), "ratio": self.ratio, "compressed_ratio": self.compressed_ratio}

    def __str__(self) -> str:
        mib = 2**20
        lines = [
            f"export {self.path}: {self.disk_bytes / mib:.1f} MiB on disk in {len(self.files)} files",
            f"tensors: {self.stored_bytes / mib:.1f} MiB stored vs {self.dense_bytes / mib:.1f} MiB dense "
            f"({self.ratio:.3f}x); {self.num_tensors} tensors, {self.num_compressed} compressed, "
            f"{self.num_aliases} aliased",
        ]
        if self.num_compressed:
            lines.append(
                f"pruned weights: {self.compressed_stored_bytes / mib:.1f} MiB vs "
                f"{self.compressed_dense_bytes / mib:.1f} MiB dense ({self.compressed_ratio:.3f}x)"
            )
        else:
            lines.append("no pruned weight found: every tensor is stored dense")
        return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _parse_size(value: int | str, argument: str = "max_shard_size") -> int:
    if isinstance(value, bool):
        raise TypeError(f"`{argument}` must be a number of bytes or a string such as '5GB', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"`{argument}` must be positive, got {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"`{argument}` must be a number of bytes or a string such as '500MB' or '2GiB', got {value!r}")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size < 1:
        raise ValueError(f"`{argument}` must be positive, got {value!r}")
    return size


def _nbytes(shape: Any, dtype: Any) -> int:
    return math.prod(int(s) for s in shape) * torch.empty(0, dtype=dtype_from_name(dtype)).element_size()


def _library_version() -> str:
    try:
        return importlib_metadata.version("wanda-lightning")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for item in [*root.rglob("*"), root]:
        with contextlib.suppress(OSError):
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _check_destination(path: str | os.PathLike[str], overwrite: bool, create_parent: bool = True) -> Path:
    """Validates the export path before any work; returns it absolute. Creates missing parent folders if asked."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"`path` must be a non-empty path, got {path!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}")
    target = Path(path).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise ValueError(f"`path` {str(target)!r} exists and is not a directory; choose a new directory")
        if any(target.iterdir()):
            if not overwrite:
                raise ValueError(
                    f"`path` {str(target)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
                )
            cwd = Path.cwd().resolve()
            protected = {Path("/").resolve(), Path.home().resolve(), cwd, *cwd.parents}
            if target.resolve() in protected:
                raise ValueError(
                    f"`path` {str(target)!r} is the root, the home or the current directory (or holds it): refusing "
                    "to replace it even with overwrite=True"
                )
    parent = target.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"`path` {str(target)!r} cannot be created: {str(ancestor)!r} is a file")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"`path` {str(target)!r} cannot be created: {str(ancestor)!r} is not writable")
            break
    if create_parent:
        parent.mkdir(parents=True, exist_ok=True)
    return target


def _install(staging: Path, target: Path, overwrite: bool) -> None:
    """Moves the finished ``staging`` directory to ``target`` with renames only (atomic on one file system)."""
    if target.exists():
        if not any(target.iterdir()):
            target.rmdir()
        elif not overwrite:
            raise ValueError(f"`path` {str(target)!r} appeared while exporting and is not empty; nothing was replaced")
        else:
            backup = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(target, backup)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
            return
    os.replace(staging, target)


class _ShardWriter:
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


# --- writing ---------------------------------------------------------------------------------------------------------


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
    max_bytes = _parse_size(max_shard_size)
    if metadata is not None:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`metadata` must be JSON-serialisable: {error}") from None
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}")
    target = _check_destination(path, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        writer = _ShardWriter(staging, max_bytes)
        entries: dict[str, dict[str, Any]] = {}
        shard_of: dict[str, int] = {}
        iterator = _iter_compressed(state_dict, dtype, masks or {}, min_sparsity)
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
            _seal(entry)
        if len(names) > 1:
            weight_map = {key: names[i] for i, keys in enumerate(writer.shards) for key in keys}
            _write_json(
                staging / INDEX_NAME, {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map}
            )
        if write_extra is not None:
            write_extra(staging)
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "producer": {"library": "wanda-lightning", "version": _library_version(), "torch": torch.__version__},
            "encoding": {
                "mask_bit_order": BIT_ORDER,
                "mask": "bit i of the row-major flattened mask is bit (i % 8) of byte (i // 8)",
                "nm_codes": "rank of the kept positions among itertools.combinations(range(m), n), packed in base "
                "C(m, n) into int64 words (digit j has weight C(m, n)**j)",
                "key_separator": KEY_SEPARATOR,
                "checksums": "sha256 of each stored tensor's little-endian bytes",
            },
            "dtype": None if dtype is None else dtype_name(dtype),
            "files": names,
            "index": INDEX_NAME if len(names) > 1 else None,
            "metadata": dict(metadata or {}),
            "tensors": entries,
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        _write_json(staging / MANIFEST_NAME, manifest)
        _fsync_tree(staging)
        _install(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summarize_export(target)


# --- reading ---------------------------------------------------------------------------------------------------------


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding an export manifest.

    Example::

        >>> is_export("/nonexistent")
        False
    """
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks the manifest of an export directory (format, version, shape of the JSON).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is not an export (no manifest), or :class:`CorruptExportError` if the manifest is invalid.

    Example::

        manifest = read_manifest("export/")
        manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["structure"]  # '2:4'
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"export directory {str(folder)!r} does not exist")
    file = folder / MANIFEST_NAME
    if not file.is_file():
        raise ValueError(f"{str(folder)!r} is not a wanda-lightning export: it has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptExportError(f"{MANIFEST_NAME} in {str(folder)!r} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptExportError(f"{MANIFEST_NAME}: format must be {FORMAT_NAME!r}, got {found!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise CorruptExportError(
            f"{MANIFEST_NAME}: this wanda-lightning reads format version {FORMAT_VERSION}, the export has version "
            f"{manifest.get('version')!r}"
        )
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("files"), list):
        raise CorruptExportError(f"{MANIFEST_NAME}: `tensors` must be an object and `files` a list")
    return manifest


def _tensors_by_file(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
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


def _check_index(folder: Path, manifest: Mapping[str, Any]) -> None:
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


def _read_shard(file: Path, names: list[str], manifest: Mapping[str, Any]) -> dict[str, Tensor]:
    """Loads one safetensors file after checking its header against the file size, naming truncated tensors."""
    key_owner = {info["key"]: name for name in names for info in manifest["tensors"][name]["parts"].values()}
    held = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
    if not file.is_file():
        raise CorruptExportError(f"file {file.name!r} is missing; it holds tensor(s) {held}")
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CorruptExportError(f"file {file.name!r} is truncated ({size} bytes); it holds tensor(s) {held}")
        (header_size,) = struct.unpack("<Q", raw)
        if 8 + header_size > size:
            raise CorruptExportError(
                f"file {file.name!r} is truncated inside its header ({size} bytes); it holds tensor(s) {held}"
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptExportError(f"file {file.name!r} has a corrupted header ({error}); it holds {held}") from None
    if not isinstance(header, dict):
        raise CorruptExportError(f"file {file.name!r} has a corrupted header; it holds {held}")
    data_size = size - 8 - header_size
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        owner = key_owner.get(key)
        if owner is None:
            raise CorruptExportError(f"file {file.name!r} stores {key!r}, which is not described by the manifest")
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptExportError(f"tensor {owner!r}: file {file.name!r} has a corrupted header entry") from None
        if stop > data_size:
            raise CorruptExportError(
                f"tensor {owner!r}: file {file.name!r} is truncated ({key!r} needs bytes {begin}-{stop} of the data, "
                f"the file holds {data_size})"
            )
        end = max(end, stop)
    missing = sorted(set(key_owner) - set(header))
    if missing:
        raise CorruptExportError(f"tensor {key_owner[missing[0]]!r}: {missing[0]!r} is missing from {file.name!r}")
    if end != data_size:
        raise CorruptExportError(f"file {file.name!r} has {data_size - end} unexpected trailing bytes; it holds {held}")
    try:
        return load_file(str(file))
    except (SafetensorError, RuntimeError, ValueError) as error:
        raise CorruptExportError(f"file {file.name!r} cannot be read ({error}); it holds tensor(s) {held}") from None


def _iter_loaded(folder: Path, manifest: Mapping[str, Any]) -> Iterator[tuple[str, Tensor]]:
    _check_index(folder, manifest)
    for file_name, names in _tensors_by_file(manifest).items():
        if Path(file_name).name != file_name:
            raise CorruptExportError(f"{MANIFEST_NAME}: file name {file_name!r} must not contain a directory")
        stored = _read_shard(folder / file_name, names, manifest)
        for name in names:
            entry = manifest["tensors"][name]
            parts = _verified_parts(name, entry, stored)
            tensor = decompress_tensor(name, parts, entry)
            _check_seal(name, entry)
            yield name, tensor
        del stored


def load_compressed(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
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
    state = _resolve_aliases(out, manifest["tensors"])
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CorruptExportError(
            f"{MANIFEST_NAME} in {str(folder)!r} does not match its own checksum `manifest_sha256`: it was edited "
            "after the export was written"
        )
    return state, manifest


def summarize_export(path: str | os.PathLike[str]) -> ExportSummary:
    """Sizes of an export from its manifest and files, without reading tensor data.

    Example::

        print(summarize_export("export/"))
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    summary = ExportSummary(path=str(folder))
    for name, entry in manifest["tensors"].items():
        summary.num_tensors += 1
        if entry.get("layout") == "alias":
            summary.num_aliases += 1
            continue
        try:
            dense = _nbytes(entry["shape"], entry["dtype"])
            stored = sum(_nbytes(p["shape"], p["dtype"]) for p in entry["parts"].values())
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptExportError(f"tensor {name!r}: manifest entry is invalid: {error}") from None
        summary.dense_bytes += dense
        summary.stored_bytes += stored
        if entry.get("layout") in ("bitmask", "nm"):
            summary.num_compressed += 1
            summary.compressed_dense_bytes += dense
            summary.compressed_stored_bytes += stored
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    summary.files = [str(p.relative_to(folder)) for p in files]
    summary.disk_bytes = sum(p.stat().st_size for p in files)
    return summary


# --- Lightning checkpoints -------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def compress_checkpoint(
    checkpoint: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ExportSummary:
    """Compresses a Lightning ``.ckpt`` (or a plain saved state dict) into an export directory.

    The checkpoint is read with ``torch.load(weights_only=True)``: no arbitrary code runs. Its ``"state_dict"`` is
    exported; hyper-parameters that are plain JSON go into the manifest's metadata. Read it back with
    :func:`load_compressed`.

    Args:
        checkpoint: A ``.ckpt`` file from ``Trainer.save_checkpoint`` / ``ModelCheckpoint``, or a ``torch.save``-d
            state dict.
        path: The export directory to create.
        dtype: Cast floating-point tensors to this dtype.
        min_sparsity: See :func:`save_compressed`.
        overwrite: Replace ``path`` if it exists and is not empty.
        max_shard_size: See :func:`save_compressed`.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        FileNotFoundError: If ``checkpoint`` does not exist.
        ValueError: If it cannot be read with ``weights_only=True`` or holds no state dict.

    Example::

        compress_checkpoint("epoch=3.ckpt", "pruned-export/")
        state_dict, _ = load_compressed("pruned-export/")
        model.load_state_dict(state_dict)
    """
    state_dict, info = read_checkpoint(checkpoint)
    return save_compressed(
        state_dict,
        path,
        dtype=dtype,
        min_sparsity=min_sparsity,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        metadata={"source": info},
    )


def read_checkpoint(checkpoint: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reads a Lightning checkpoint's state dict safely (``weights_only=True``), with JSON-safe details.

    Returns:
        ``(state_dict, info)`` where ``info`` has the kind, file name, JSON-safe hyper-parameters, epoch and step.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a checkpoint loadable with ``weights_only=True`` or holds no tensors.

    Example::

        state_dict, info = read_checkpoint("epoch=3.ckpt")
    """
    file = Path(checkpoint)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(file)!r} does not exist")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for non-checkpoints
        raise ValueError(
            f"checkpoint {str(file)!r} cannot be read with torch.load(weights_only=True): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        state_dict = dict(loaded["state_dict"])
        kind = "lightning-checkpoint"
    elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        state_dict, kind = dict(loaded), "state-dict"
    else:
        raise ValueError(
            f"checkpoint {str(file)!r} holds neither a Lightning checkpoint (a dict with 'state_dict') nor a state "
            f"dict of tensors; got {type(loaded).__name__}"
        )
    info = {
        "kind": kind,
        "file": file.name,
        "hyper_parameters": _json_safe(loaded.get("hyper_parameters")) if kind == "lightning-checkpoint" else None,
        "epoch": _json_safe(loaded.get("epoch")),
        "global_step": _json_safe(loaded.get("global_step")),
    }
    return state_dict, info
