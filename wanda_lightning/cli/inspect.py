"""per-layer sparsity, N:M check, format and on-disk size against dense

Inspect an export (verifying it), a transformers directory, a .safetensors file or a Lightning checkpoint: per-tensor
layout, sparsity, N:M pattern, stored and dense bytes (numel x dtype size).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["add_arguments", "inspect_path", "nm_pattern", "run"]

_MIB = 2**20


def nm_pattern(tensor: Tensor) -> str | None:
    """The tightest N:M pattern (M in 4, 8; at most half kept) a 2-D weight follows, or ``None``.

    Groups run along the last dim (``nn.Linear``), else along dim 0 (transformers' ``Conv1D``, marked ``"(dim 0)"``).

    Example::

        >>> nm_pattern(torch.tensor([[1.0, 0.0, 0.0, 2.0]] * 4))
        '2:4'
        >>> nm_pattern(torch.ones(4, 8)) is None
        True
    """
    from ..export.packing import count_nonzero_groups

    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    nonzero = tensor != 0
    for dim, view in ((1, nonzero), (0, nonzero.t())):
        for m in (4, 8):
            if view.shape[1] % m:
                continue
            n = int(count_nonzero_groups(view, m).max())
            if 0 < n <= m // 2:
                return f"{n}:{m}" + ("" if dim == 1 else " (dim 0)")
    return None


def _row(name: str, layout: str, tensor_or_shape: Any, dtype: torch.dtype, stored: int | None) -> dict[str, Any]:
    shape = list(tensor_or_shape.shape) if isinstance(tensor_or_shape, Tensor) else list(tensor_or_shape)
    dense = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    row: dict[str, Any] = {
        "name": name,
        "layout": layout,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "sparsity": None,
        "n_m": None,
        "stored_bytes": dense if stored is None else stored,
        "dense_bytes": dense,
    }
    if isinstance(tensor_or_shape, Tensor) and tensor_or_shape.dim() == 2 and tensor_or_shape.is_floating_point():
        row["sparsity"] = float((tensor_or_shape == 0).float().mean()) if tensor_or_shape.numel() else 0.0
        row["n_m"] = nm_pattern(tensor_or_shape)
    return row


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, handle.get_tensor(key)


def _inspect_export(path: Path, verify: bool) -> dict[str, Any]:
    from ..export import load_compressed, read_manifest, summarize_export

    manifest = read_manifest(path)
    state = load_compressed(path)[0] if verify else None
    rows = []
    for name, entry in manifest["tensors"].items():
        dtype = getattr(torch, entry["dtype"])
        layout = entry["layout"]
        if layout == "alias":
            row = _row(name, f"alias of {entry['target']}", entry["shape"], dtype, 0)
        else:
            stored = sum(
                math.prod(p["shape"]) * torch.empty(0, dtype=getattr(torch, p["dtype"])).element_size()
                for p in entry["parts"].values()
            )
            source = state[name] if state is not None else entry["shape"]
            row = _row(
                name, {"nm": "N:M codes", "bitmask": "values+bitmask"}.get(layout, layout), source, dtype, stored
            )
            if state is None and layout in ("bitmask", "nm"):
                row["sparsity"] = entry["sparsity"]
                row["n_m"] = entry["structure"] if layout == "nm" else None
        rows.append(row)
    summary = summarize_export(path)
    return {
        "path": str(path),
        "format": f"{manifest['format']} v{manifest['version']}",
        "verified": verify,
        "disk_bytes": summary.disk_bytes,
        "tensor_file_bytes": sum((path / f).stat().st_size for f in manifest["files"]),
        "tensors": rows,
    }


def _inspect_dense(path: Path, tensors: Iterator[tuple[str, Tensor]], files: list[Path], fmt: str) -> dict[str, Any]:
    rows = [_row(name, "dense", tensor, tensor.dtype, None) for name, tensor in tensors]
    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {
        "path": str(path),
        "format": fmt,
        "verified": False,
        "disk_bytes": disk,
        "tensor_file_bytes": sum(f.stat().st_size for f in files),
        "tensors": rows,
    }


def inspect_path(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Per-tensor layout, sparsity, N:M pattern and sizes of an export, a transformers directory, a ``.safetensors``
    file or a Lightning checkpoint, with totals.

    Args:
        path: What to inspect.
        verify: For an export, read and verify every tensor (checksums, popcounts) and measure sparsity and N:M
            patterns from the weights; ``False`` reads only the manifest.

    Returns:
        A JSON-ready dictionary: ``path``, ``format``, ``verified``, ``disk_bytes``, ``tensor_file_bytes``,
        ``dense_bytes``, ``ratio``, ``tensors`` (one row each) and the pruned weights' totals.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is none of the kinds above, or an export fails verification.

    Example::

        report = inspect_path("smollm2-2of4/")
        report["pruned_ratio"]  # 0.542
    """
    from ..export import is_export
    from ..export.checkpoints import read_checkpoint

    target = Path(path).expanduser()
    if not target.exists():
        raise FileNotFoundError(f"PATH {str(path)!r} does not exist")
    if target.is_dir() and is_export(target):
        result = _inspect_export(target, verify)
    elif target.is_dir():
        files = _safetensors_files(target)
        if not files:
            raise ValueError(
                f"PATH {str(path)!r} holds no sparse_manifest.json and no .safetensors file (inspect reads no pickle "
                "files such as pytorch_model.bin)"
            )
        result = _inspect_dense(target, _iter_safetensors(files), files, "dense safetensors")
    elif target.suffix == ".safetensors":
        result = _inspect_dense(target, _iter_safetensors([target]), [target], "dense safetensors")
    elif target.suffix.lower() in (".ckpt", ".pt", ".pth"):
        state_dict, info = read_checkpoint(target)
        result = _inspect_dense(target, iter(state_dict.items()), [target], info["kind"])
    else:
        raise ValueError(
            f"PATH {str(path)!r} must be a wanda-lightning export, a transformers directory, a .safetensors file or a "
            "Lightning .ckpt (a GGUF file is quantized: `wanda-lightning prune` it first)"
        )
    rows = [r for r in result["tensors"] if not r["layout"].startswith("alias")]
    pruned = [r for r in rows if r["layout"] in ("values+bitmask", "N:M codes")]
    if not pruned:  # a dense model: the weights that are sparse (at least 25 % zeros) would be compressed
        pruned = [r for r in rows if (r["sparsity"] or 0.0) >= 0.25]
    result["dense_bytes"] = sum(r["dense_bytes"] for r in rows)
    result["stored_bytes"] = sum(r["stored_bytes"] for r in rows)
    result["ratio"] = result["stored_bytes"] / result["dense_bytes"] if result["dense_bytes"] else 1.0
    result["pruned_tensors"] = len(pruned)
    result["pruned_dense_bytes"] = sum(r["dense_bytes"] for r in pruned)
    result["pruned_stored_bytes"] = sum(r["stored_bytes"] for r in pruned)
    result["pruned_ratio"] = (
        result["pruned_stored_bytes"] / result["pruned_dense_bytes"] if result["pruned_dense_bytes"] else 1.0
    )
    return result


def _size(num_bytes: int) -> str:
    return f"{num_bytes / _MIB:.2f} MiB" if num_bytes >= _MIB else f"{num_bytes / 1024:.1f} KiB"


def _print(result: dict[str, Any]) -> None:
    header = ["tensor", "layout", "shape", "dtype", "sparsity", "N:M", "stored", "dense"]
    rows = [
        [
            r["name"],
            r["layout"],
            "x".join(map(str, r["shape"])) or "scalar",
            r["dtype"],
            "-" if r["sparsity"] is None else f"{r['sparsity']:.2%}",
            r["n_m"] or "-",
            _size(r["stored_bytes"]),
            _size(r["dense_bytes"]),
        ]
        for r in result["tensors"]
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for index, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(f"path             {result['path']}")
    verified = " (verified: checksums, shapes, popcounts)" if result["verified"] else ""
    print(f"format           {result['format']}{verified}")
    print(f"on disk          {_size(result['disk_bytes'])} ({_size(result['tensor_file_bytes'])} in tensor files)")
    print(
        f"tensors          {_size(result['stored_bytes'])} stored vs {_size(result['dense_bytes'])} dense "
        f"({result['ratio']:.3f}x)"
    )
    if result["pruned_tensors"]:
        print(
            f"pruned weights   {result['pruned_tensors']} tensors, {_size(result['pruned_stored_bytes'])} stored vs "
            f"{_size(result['pruned_dense_bytes'])} dense ({result['pruned_ratio']:.3f}x)"
        )
    else:
        print("pruned weights   none (no 2-D weight with at least 25 % zeros)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning inspect``."""
    parser.add_argument("path", metavar="PATH", help="export directory, transformers directory, .safetensors or .ckpt")
    parser.add_argument(
        "--no-verify", action="store_true", help="for an export, read only the manifest (skip checksums and patterns)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Prints the per-tensor table and totals of PATH; returns the exit status.

    Example::

        main(["inspect", "pruned/", "--json"])
    """
    result = inspect_path(args.path, verify=not args.no_verify)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0
