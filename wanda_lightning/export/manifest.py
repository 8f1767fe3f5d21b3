"""The export's manifest (``sparse_manifest.json``): its typed shape, how it is built, checksummed, read and checked,
and the sizes it describes (:class:`ExportSummary`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, TypedDict, cast

import torch

from .format import FORMAT_NAME, FORMAT_VERSION, KEY_SEPARATOR, CorruptExportError, dtype_from_name, dtype_name
from .packing import BIT_ORDER

__all__ = [
    "MANIFEST_NAME",
    "ExportSummary",
    "Manifest",
    "build_manifest",
    "is_export",
    "manifest_digest",
    "read_manifest",
    "summarize_export",
]

MANIFEST_NAME = "sparse_manifest.json"


class Manifest(TypedDict):
    """What ``sparse_manifest.json`` holds (a JSON object with these keys).

    Attributes:
        format: ``"wanda-lightning-sparse"``.
        version: Format version (1).
        producer: Library, its version and torch's.
        encoding: How masks and N:M codes are laid out, in words.
        dtype: The dtype floating-point tensors were cast to, or ``None``.
        files: The safetensors files, in order.
        index: The index file's name when there are several files, else ``None``.
        metadata: Caller information (``"transformers"`` for :func:`~wanda_lightning.export.save_pruned`, ``"source"``
            for checkpoints).
        tensors: One entry per tensor name (layout, shape, dtype, parts with keys, files and SHA-256, structure,
            sparsity, kept count, its own checksum); see :mod:`~wanda_lightning.export.format`.
        manifest_sha256: Checksum of everything above.
    """

    format: str
    version: int
    producer: dict[str, str]
    encoding: dict[str, str]
    dtype: str | None
    files: list[str]
    index: str | None
    metadata: dict[str, Any]
    tensors: dict[str, dict[str, Any]]
    manifest_sha256: str


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


def _nbytes(shape: Any, dtype: Any) -> int:
    return math.prod(int(s) for s in shape) * torch.empty(0, dtype=dtype_from_name(dtype)).element_size()


def _library_version() -> str:
    try:
        return importlib_metadata.version("wanda-lightning")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(
    entries: dict[str, dict[str, Any]],
    files: list[str],
    index: str | None,
    dtype: torch.dtype | None,
    metadata: dict[str, Any],
) -> Manifest:
    """The manifest of an export holding ``entries`` (sealed) in ``files``, with its own checksum."""
    manifest = Manifest(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        producer={"library": "wanda-lightning", "version": _library_version(), "torch": torch.__version__},
        encoding={
            "mask_bit_order": BIT_ORDER,
            "mask": "bit i of the row-major flattened mask is bit (i % 8) of byte (i // 8)",
            "nm_codes": "rank of the kept positions among itertools.combinations(range(m), n), packed in base "
            "C(m, n) into int64 words (digit j has weight C(m, n)**j)",
            "key_separator": KEY_SEPARATOR,
            "checksums": "sha256 of each stored tensor's little-endian bytes",
        },
        dtype=None if dtype is None else dtype_name(dtype),
        files=files,
        index=index,
        metadata=metadata,
        tensors=entries,
        manifest_sha256="",
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding an export manifest.

    Example::

        >>> is_export("/nonexistent")
        False
    """
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
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
    return cast(Manifest, manifest)


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
