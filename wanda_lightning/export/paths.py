"""Writing a directory safely: size arguments, destination checks, atomic installation by rename, fsync."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

__all__ = ["check_destination", "fsync_tree", "install", "parse_size", "write_json"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_UNITS["TIB"] = 2**40


def parse_size(value: int | str, argument: str = "max_shard_size") -> int:
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


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def fsync_tree(root: Path) -> None:
    for item in [*root.rglob("*"), root]:
        with contextlib.suppress(OSError):
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def check_destination(path: str | os.PathLike[str], overwrite: bool, create_parent: bool = True) -> Path:
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


def install(staging: Path, target: Path, overwrite: bool) -> None:
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
