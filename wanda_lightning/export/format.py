"""The in-memory half of the export format: tensors to (stored parts, manifest entry) and back, bit for bit.

Framework-free (pure torch, ``hashlib`` and JSON-ready dictionaries): works for any ``state_dict``, including
Lightning checkpoints and custom modules. Files are handled by :mod:`wanda_lightning.export.directory`.

Layouts of a manifest entry (``entry["layout"]``):

* ``"dense"``: stored as is under the tensor's own name (part ``"data"``).
* ``"bitmask"``: part ``"values"`` holds the kept values, 1-D in row-major order, and part ``"mask"`` the packed
  1-bit mask (:func:`~wanda_lightning.export.packing.pack_bits`).
* ``"nm"``: the weight is viewed as ``(rows, cols)`` with groups of ``m`` along ``cols`` (``group_dim`` 1: the last
  dim; ``group_dim`` 0: the first, for transformers' ``Conv1D`` whose weight is ``(in, out)``, viewed transposed);
  part ``"values"`` holds exactly ``n`` values per group in that order and part ``"codes"`` the packed combination
  codes (:func:`~wanda_lightning.export.packing.pack_radix`). A group with fewer than ``n`` non-zeros stores zeros at
  its first unused positions, so decoding is still exact.
* ``"alias"``: the same storage as ``entry["target"]`` (tied embeddings); nothing stored.

Which positions are "kept": the true mask when it is given, else every entry that is not equal to zero (NaN included).
Kept values are stored bit for bit (a kept ``-0.0`` stays ``-0.0``); a pruned position is restored as ``+0.0``, so a
pruned ``-0.0`` (as ``weight * mask`` leaves them) comes back as ``+0.0``, equal as a number. ``prune()`` zeroes with
``masked_fill_``, so its models round-trip bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .packing import (
    codes_per_word,
    nm_group_codes,
    nm_group_masks,
    pack_bits,
    pack_radix,
    unpack_bits,
    unpack_radix,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KEY_SEPARATOR",
    "CorruptExportError",
    "check_entry_seal",
    "compress_state_dict",
    "compress_tensor",
    "decompress_state_dict",
    "decompress_tensor",
    "dtype_from_name",
    "dtype_name",
    "entry_digest",
    "iter_compressed",
    "resolve_aliases",
    "seal_entry",
    "tensor_sha256",
    "verified_parts",
]

FORMAT_NAME = "wanda-lightning-sparse"
FORMAT_VERSION = 1
KEY_SEPARATOR = ":"
DEFAULT_MIN_SPARSITY = 0.25
_NM_GROUP_SIZES = (2, 4, 8, 16)
_ROLES = {"dense": ("data",), "bitmask": ("values", "mask"), "nm": ("values", "codes"), "alias": ()}


class CorruptExportError(ValueError):
    """An export (or a compressed state dict) that fails verification; the message names the tensor or file.

    Example::

        >>> raise CorruptExportError("tensor 'lm.weight': checksum mismatch")
        Traceback (most recent call last):
        ...
        wanda_lightning.export.format.CorruptExportError: tensor 'lm.weight': checksum mismatch
    """


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``.

    Example::

        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``.

    Raises:
        ValueError: If ``name`` is not the name of a torch dtype.

    Example::

        >>> dtype_from_name("float16")
        torch.float16
    """
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name such as 'float32' or 'bfloat16'")
    return dtype


def tensor_sha256(tensor: Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes as stored: contiguous, row-major, native (little-endian) byte order.

    Example::

        >>> tensor_sha256(torch.zeros(0))[:16]
        'e3b0c44298fc1c14'
    """
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.numel():
        return hashlib.sha256(b"").hexdigest()
    data: Any = flat.contiguous().view(torch.uint8).numpy()  # zero-copy buffer of the stored bytes
    return hashlib.sha256(data).hexdigest()


def _error(name: str, message: str) -> CorruptExportError:
    return CorruptExportError(f"tensor {name!r}: {message}")


# --- one tensor ------------------------------------------------------------------------------------------------------


def _grouped(tensor: Tensor, group_dim: int) -> Tensor:
    # (rows, cols) view with the groups along cols.
    return tensor if group_dim == 1 else tensor.t()


def _nm_candidates(kept: Tensor, itemsize: int, limit_bits: int) -> list[tuple[int, int, int, int]]:
    """``(bits, n, m, group_dim)`` for the N:M encodings of ``kept`` that may take fewer than ``limit_bits``.

    ``n`` is the largest kept count of a group. The kept fraction ``n / m`` can only grow as ``m`` shrinks, so when
    the largest group size already needs more than ``limit_bits`` for its values, no smaller one is tried.
    """
    found = []
    value_bits = itemsize * 8
    for group_dim in (1, 0):
        view = _grouped(kept, group_dim)
        rows, cols = view.shape
        sizes = [m for m in _NM_GROUP_SIZES if cols % m == 0]
        if not sizes:
            continue
        largest = sizes[-1]
        # (rows, cols // largest) counts in one pass; a transposed view is copied once to make it contiguous.
        top = view.contiguous().view(torch.uint8).view(rows, cols // largest, largest).sum(dim=-1, dtype=torch.uint8)
        if int(top.max()) * (kept.numel() // largest) * value_bits > limit_bits:
            continue
        counts = view.contiguous().view(torch.uint8)
        for m in sizes:
            # Counts of groups of m from counts of groups of m / 2: one pass of pairwise sums per size.
            counts = counts[..., 0::2] + counts[..., 1::2]
            n = int(counts.max())
            groups = counts.numel()
            base = math.comb(m, n)
            per_word = codes_per_word(base)
            words = 0 if per_word == 0 else -(-groups // per_word)
            found.append((n * groups * value_bits + words * 64, n, m, group_dim))
    return found


def _encode_nm(tensor: Tensor, kept: Tensor, n: int, m: int, group_dim: int) -> tuple[Tensor, Tensor]:
    view = _grouped(tensor, group_dim).contiguous()
    groups = _grouped(kept, group_dim).contiguous().view(-1, m)  # (G, m)
    missing = n - groups.sum(dim=1, keepdim=True)  # (G, 1) >= 0
    if bool((missing > 0).any()):
        # Fill groups holding fewer than n non-zeros with their first free positions (stored zeros, still exact).
        free = ~groups
        groups = groups | (free & (free.cumsum(dim=1) <= missing))
    values = view.reshape(-1).masked_select(groups.reshape(-1))
    codes = nm_group_codes(groups, n)
    return values, pack_radix(codes, math.comb(m, n))


def compress_tensor(
    tensor: Tensor, mask: Tensor | None = None, min_sparsity: float = DEFAULT_MIN_SPARSITY
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Encodes one tensor in the smallest lossless layout.

    A floating-point 2-D tensor whose zero fraction is at least ``min_sparsity`` gets the ``"bitmask"`` or ``"nm"``
    layout, whichever takes fewer bytes; anything else is ``"dense"``.

    Args:
        tensor: Any tensor (moved to the CPU).
        mask: The true keep mask of a pruned weight (same shape, boolean), so that a kept weight that happens to be
            ``0.0`` stays "kept"; ``None`` derives it from the non-zero entries.
        min_sparsity: Smallest fraction of pruned positions for which a 2-D tensor is compressed.

    Returns:
        ``(parts, entry)``: the tensors to store by role (``"data"``, ``"values"``, ``"mask"``, ``"codes"``) and the
        manifest entry without storage keys or checksums (see the module docstring).

    Raises:
        ValueError: If ``mask`` has the wrong shape or dtype, or ``tensor`` is not zero where ``mask`` is False.

    Example::

        >>> weight = torch.tensor([[1.0, 2.0, 0.0, 0.0]]).repeat(8, 16)  # 2:4 sparse, (8, 64)
        >>> parts, entry = compress_tensor(weight)
        >>> entry["layout"], entry["structure"], parts["values"].shape, parts["codes"].shape
        ('nm', '2:4', torch.Size([256]), torch.Size([6]))
        >>> compress_tensor(torch.tensor([[1.0, 0.0, 0.0, 2.0]]))[1]["layout"]  # too small for N:M codes to pay
        'bitmask'
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    entry: dict[str, Any] = {"layout": "dense", "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    compressible = tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel() > 0
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != tensor.shape:
            raise ValueError(
                f"a mask must be a boolean tensor of the weight's shape {tuple(tensor.shape)}, got "
                f"{type(mask).__name__}{'' if not isinstance(mask, Tensor) else f' {mask.dtype} {tuple(mask.shape)}'}"
            )
        mask = mask.detach().cpu()
        if bool(((tensor != 0) & ~mask).any()):
            raise ValueError("the tensor is not zero everywhere its mask is False: the mask is not the one applied")
    if not compressible:
        return {"data": tensor}, entry
    kept = mask if mask is not None else tensor != 0
    num_kept = int(torch.count_nonzero(kept))
    sparsity = 1.0 - num_kept / tensor.numel()
    if sparsity < min_sparsity:
        return {"data": tensor}, entry
    itemsize = tensor.element_size()
    bitmask_bits = num_kept * itemsize * 8 + ((tensor.numel() + 7) // 8) * 8
    candidates = _nm_candidates(kept, itemsize, bitmask_bits)
    # Fewest bits; on a tie the usual orientation (groups along the last dim) and the smaller group.
    best = min(candidates, key=lambda c: (c[0], c[3] != 1, c[2]), default=None)
    if best is not None and best[0] <= bitmask_bits:
        _, n, m, group_dim = best
        values, codes = _encode_nm(tensor, kept, n, m, group_dim)
        groups = tensor.numel() // m
        entry.update(
            layout="nm",
            structure=f"{n}:{m}",
            sparsity=1.0 - (n * groups) / tensor.numel(),
            kept=n * groups,
            n=n,
            m=m,
            group_dim=group_dim,
        )
        return {"values": values, "codes": codes}, entry
    values = tensor.reshape(-1).masked_select(kept.reshape(-1))
    entry.update(layout="bitmask", structure="unstructured", sparsity=sparsity, kept=num_kept)
    return {"values": values, "mask": pack_bits(kept)}, entry


def _check_part(name: str, role: str, part: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if part.dtype != dtype or tuple(part.shape) != shape:
        found = f"{dtype_name(part.dtype)} {tuple(part.shape)}"
        raise _error(name, f"stored {role!r} is {found}, expected {dtype_name(dtype)} {shape}")


def decompress_tensor(name: str, parts: Mapping[str, Tensor], entry: Mapping[str, Any]) -> Tensor:
    """Rebuilds one tensor from its stored parts and manifest entry, checking every count on the way.

    Args:
        name: The tensor's name, used in error messages.
        parts: Stored tensors by role.
        entry: Its manifest entry (see :func:`compress_tensor`).

    Returns:
        The tensor, bit for bit as compressed (pruned positions are ``+0.0``).

    Raises:
        CorruptExportError: If a part is missing, has the wrong dtype or size, or a count disagrees with the entry.

    Example::

        >>> parts, entry = compress_tensor(torch.tensor([[1.0, 0.0, 0.0, 2.0]]))
        >>> decompress_tensor("w", parts, entry).tolist()
        [[1.0, 0.0, 0.0, 2.0]]
    """
    layout = entry.get("layout")
    try:
        shape = tuple(int(s) for s in entry["shape"])
        dtype = dtype_from_name(entry["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        raise _error(name, f"manifest entry has no valid shape/dtype: {error}") from None
    numel = math.prod(shape)
    for role in _ROLES.get(str(layout), ()):
        if role not in parts:
            raise _error(name, f"stored part {role!r} is missing")
    if layout == "dense":
        data = parts["data"]
        _check_part(name, "data", data, dtype, shape)
        return data
    if layout not in ("bitmask", "nm"):
        raise _error(name, f"unknown layout {layout!r}; this version reads 'dense', 'bitmask', 'nm' and 'alias'")
    if len(shape) != 2:
        raise _error(name, f"layout {layout!r} needs a 2-D shape, got {list(shape)}")
    kept = entry.get("kept")
    if not isinstance(kept, int) or isinstance(kept, bool) or not 0 <= kept <= numel:
        raise _error(name, f"manifest `kept` must be an integer in [0, {numel}], got {kept!r}")
    sparsity = 1.0 - kept / numel
    if entry.get("sparsity") != sparsity:
        raise _error(name, f"manifest sparsity {entry.get('sparsity')!r} disagrees with kept={kept} of {numel}")
    values = parts["values"]
    _check_part(name, "values", values, dtype, (kept,))
    if layout == "bitmask":
        if entry.get("structure") != "unstructured":
            raise _error(name, f"layout 'bitmask' has structure 'unstructured', got {entry.get('structure')!r}")
        mask_bytes = parts["mask"]
        _check_part(name, "mask", mask_bytes, torch.uint8, ((numel + 7) // 8,))
        try:
            mask = unpack_bits(mask_bytes, numel)
        except ValueError as error:
            raise _error(name, f"mask: {error}") from None
        count = int(torch.count_nonzero(mask))
        if count != kept:
            raise _error(name, f"mask popcount {count} differs from the manifest's kept count {kept}")
        return torch.zeros(numel, dtype=dtype).masked_scatter_(mask, values).view(shape)
    n, m, group_dim = entry.get("n"), entry.get("m"), entry.get("group_dim")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m, group_dim)):
        raise _error(name, f"layout 'nm' needs integers n, m, group_dim, got {n!r}, {m!r}, {group_dim!r}")
    assert isinstance(n, int) and isinstance(m, int) and isinstance(group_dim, int)
    if group_dim not in (0, 1) or m not in _NM_GROUP_SIZES or not 0 <= n <= m:
        raise _error(name, f"invalid N:M parameters n={n}, m={m}, group_dim={group_dim}")
    if entry.get("structure") != f"{n}:{m}":
        raise _error(name, f"structure {entry.get('structure')!r} disagrees with n={n}, m={m}")
    rows, cols = (shape[0], shape[1]) if group_dim == 1 else (shape[1], shape[0])
    if cols % m:
        raise _error(name, f"{cols} columns are not a multiple of m={m}")
    groups = numel // m
    if kept != n * groups:
        raise _error(name, f"kept count {kept} differs from n x groups = {n} x {groups}")
    base = math.comb(m, n)
    per_word = codes_per_word(base)
    words = 0 if per_word == 0 else -(-groups // per_word)
    _check_part(name, "codes", parts["codes"], torch.int64, (words,))
    try:
        codes = unpack_radix(parts["codes"], base, groups)
        group_masks = nm_group_masks(codes, n, m)  # (G, m)
    except ValueError as error:
        raise _error(name, f"N:M codes: {error}") from None
    out = torch.zeros(rows * cols, dtype=dtype).masked_scatter_(group_masks.view(-1), values).view(rows, cols)
    return out if group_dim == 1 else out.t().contiguous()


# --- state dicts -----------------------------------------------------------------------------------------------------


def _storage_key(tensor: Tensor) -> tuple[Any, ...] | None:
    if tensor.numel() == 0 or tensor.is_meta:
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def entry_digest(entry: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest entry's canonical JSON, without its own ``"entry_sha256"``.

    Example::

        >>> entry_digest({"layout": "dense", "entry_sha256": "x"}) == entry_digest({"layout": "dense"})
        True
    """
    body = {key: value for key, value in entry.items() if key != "entry_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """Records ``entry``'s own checksum in it (``entry_sha256``, see :func:`entry_digest`) and returns it.

    Example::

        >>> check_entry_seal("w", seal_entry({"layout": "dense"}))
    """
    entry["entry_sha256"] = entry_digest(entry)
    return entry


def check_entry_seal(name: str, entry: Mapping[str, Any]) -> None:
    """Checks that tensor ``name``'s manifest entry still matches the checksum :func:`seal_entry` recorded.

    Raises:
        CorruptExportError: If the entry was edited after it was sealed.
    """
    if entry.get("entry_sha256") != entry_digest(entry):
        raise _error(name, "its manifest entry does not match its checksum `entry_sha256`: the manifest was edited")


def _target_digest(entry: Mapping[str, Any]) -> str:
    """One checksum over a stored entry's parts, recorded by its aliases."""
    parts = entry.get("parts", {})
    joined = "".join(f"{role}={parts[role].get('sha256')};" for role in sorted(parts))
    return hashlib.sha256(joined.encode()).hexdigest()


def compress_state_dict(
    state_dict: Mapping[str, Tensor],
    dtype: torch.dtype | None = None,
    *,
    masks: Mapping[str, Tensor] | None = None,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """Compresses a state dict: pruned 2-D weights to kept values + packed mask or N:M codes, the rest as is.

    Tensors sharing storage (tied embeddings) are stored once; later names become ``"alias"`` entries.

    Args:
        state_dict: Name -> tensor, e.g. ``module.state_dict()`` or a Lightning checkpoint's ``"state_dict"``.
        dtype: Cast floating-point tensors to this dtype first; ``None`` keeps each tensor's dtype.
        masks: Optional true keep masks by name (see :func:`compress_tensor`).
        min_sparsity: Smallest pruned fraction for which a 2-D floating-point tensor is compressed, in ``[0, 1]``.

    Returns:
        ``(tensors, entries)``: the tensors to store, by storage key (a dense tensor keeps its name, a compressed one
        is stored as ``"<name>:values"`` and ``"<name>:mask"`` or ``"<name>:codes"``), and the manifest entries by
        name, each with its parts' keys, dtypes, shapes and SHA-256 checksums.

    Raises:
        TypeError: If a value is not a tensor or ``dtype`` is not a floating-point dtype.
        ValueError: If a name contains ``":"`` and clashes with a storage key, a mask does not match, or
            ``min_sparsity`` is out of range.

    Example::

        >>> weight = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0]]).repeat(8, 16)
        >>> tensors, entries = compress_state_dict({"w": weight, "tied": weight, "b": torch.ones(2)})
        >>> sorted(tensors), entries["w"]["structure"], entries["tied"]["layout"]
        (['b', 'w:codes', 'w:values'], '2:4', 'alias')
        >>> torch.equal(decompress_state_dict(tensors, entries)["tied"], weight)
        True
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating-point torch.dtype or None, got {dtype!r}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"`min_sparsity` must be a number in [0, 1], got {min_sparsity!r}")
    masks = masks or {}
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise ValueError(f"`masks` names tensors that are not in the state dict: {unknown[:5]}")
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, tensor, entry, parts in iter_compressed(state_dict, dtype, masks, min_sparsity):
        entries[name] = seal_entry(entry)
        for role, part in parts.items():
            key = entry["parts"][role]["key"]
            if key in tensors:
                raise ValueError(f"storage key {key!r} of tensor {name!r} clashes with another tensor's key")
            tensors[key] = part
        del tensor
    return tensors, entries


def iter_compressed(
    state_dict: Mapping[str, Tensor],
    dtype: torch.dtype | None,
    masks: Mapping[str, Tensor],
    min_sparsity: float,
) -> Iterator[tuple[str, Tensor, dict[str, Any], dict[str, Tensor]]]:
    """Compresses a state dict one tensor at a time, so that a writer can store each before the next is made.

    Args:
        state_dict: Name -> tensor.
        dtype: Cast floating-point tensors to this dtype first; ``None`` keeps each tensor's dtype.
        masks: True keep masks by name (see :func:`compress_tensor`).
        min_sparsity: Smallest pruned fraction for which a 2-D floating-point tensor is compressed.

    Yields:
        ``(name, tensor, entry, parts)``: the unsealed manifest entry and the parts to store by role (empty for an
        alias of a tensor already yielded).

    Raises:
        TypeError: If a key is not a non-empty string or a value is not a tensor.
        ValueError: If a tensor is on the meta device, a mask does not match, or a storage key clashes with a name.
    """
    seen: dict[tuple[Any, ...], str] = {}
    stored: dict[str, dict[str, Any]] = {}
    names = set(state_dict)
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"state dict keys must be non-empty strings, got {name!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state dict value {name!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device: materialise the weights before exporting")
        key = _storage_key(tensor)
        if key is not None and key in seen:
            target = seen[key]
            entry = {
                "layout": "alias",
                "target": target,
                "shape": list(tensor.shape),
                "dtype": stored[target]["dtype"],
                "target_sha256": _target_digest(stored[target]),
            }
            yield name, tensor, entry, {}
            continue
        cast = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        mask = masks.get(name)
        try:
            parts, entry = compress_tensor(cast, mask, min_sparsity)
        except ValueError as error:
            raise ValueError(f"tensor {name!r}: {error}") from None
        entry["parts"] = {}
        for role, part in parts.items():
            storage_key = name if entry["layout"] == "dense" else f"{name}{KEY_SEPARATOR}{role}"
            if storage_key != name and storage_key in names:
                raise ValueError(f"storage key {storage_key!r} of tensor {name!r} clashes with a tensor of that name")
            entry["parts"][role] = {
                "key": storage_key,
                "dtype": dtype_name(part.dtype),
                "shape": list(part.shape),
                "sha256": tensor_sha256(part),
            }
        if key is not None:
            seen[key] = name
        stored[name] = entry
        yield name, tensor, entry, parts


def verified_parts(name: str, entry: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The stored parts of tensor ``name`` by role, each checked against its manifest entry (dtype, shape, SHA-256).

    Args:
        name: The tensor's name, for error messages.
        entry: Its manifest entry (not an alias).
        tensors: Stored tensors by storage key.

    Raises:
        CorruptExportError: If the layout is unknown, a part is missing, or a part's dtype, shape or checksum differ.
    """
    layout = entry.get("layout")
    if layout not in _ROLES:
        raise _error(name, f"unknown layout {layout!r}; this version reads {sorted(_ROLES)}")
    recorded = entry.get("parts")
    if not isinstance(recorded, Mapping) or set(recorded) != set(_ROLES[str(layout)]):
        raise _error(name, f"layout {layout!r} stores parts {list(_ROLES[str(layout)])}, manifest lists {recorded!r}")
    parts: dict[str, Tensor] = {}
    for role, info in recorded.items():
        key = info.get("key") if isinstance(info, Mapping) else None
        if not isinstance(key, str) or key not in tensors:
            raise _error(name, f"stored part {role!r} (key {key!r}) is missing from the files")
        part = tensors[key]
        try:
            dtype = dtype_from_name(info.get("dtype"))
            shape = tuple(int(s) for s in info.get("shape"))
        except (TypeError, ValueError) as error:
            raise _error(name, f"manifest part {role!r} has no valid dtype/shape: {error}") from None
        _check_part(name, role, part, dtype, shape)
        digest = tensor_sha256(part)
        if digest != info.get("sha256"):
            raise _error(
                name, f"checksum mismatch in part {role!r} (key {key!r}): the stored bytes were altered or truncated"
            )
        parts[role] = part
    return parts


def decompress_state_dict(
    tensors: Mapping[str, Tensor],
    entries: Mapping[str, Mapping[str, Any]],
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Inverse of :func:`compress_state_dict`, verifying checksums, shapes, dtypes and mask popcounts.

    Args:
        tensors: Stored tensors by storage key.
        entries: Manifest entries by tensor name.
        device: Where the returned tensors go; ``None`` keeps them on the CPU.

    Returns:
        The state dict, in the order of ``entries``; aliases are the same tensor object as their target.

    Raises:
        CorruptExportError: Naming the tensor, if anything fails verification, a stored tensor is not referenced by
            any entry, or an alias points nowhere.

    Example::

        >>> tensors, entries = compress_state_dict({"w": torch.eye(4)})
        >>> torch.equal(decompress_state_dict(tensors, entries)["w"], torch.eye(4))
        True
    """
    referenced: set[str] = set()
    out: dict[str, Tensor] = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise _error(name, f"manifest entry must be an object, got {type(entry).__name__}")
        if entry.get("layout") == "alias":
            continue
        parts = verified_parts(name, entry, tensors)
        referenced.update(info["key"] for info in entry["parts"].values())
        tensor = decompress_tensor(name, parts, entry)
        check_entry_seal(name, entry)
        out[name] = tensor if device is None else tensor.to(device)
    unreferenced = sorted(set(tensors) - referenced)
    if unreferenced:
        raise CorruptExportError(f"stored tensor(s) {unreferenced[:5]} are not described by the manifest")
    return resolve_aliases(out, entries)


def resolve_aliases(out: dict[str, Tensor], entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
    """Adds every alias entry to ``out`` as its target tensor, after checking the alias against its target.

    Args:
        out: The decompressed tensors by name (aliases are added to it).
        entries: Manifest entries by name, aliases included.

    Returns:
        The state dict in the order of ``entries``.

    Raises:
        CorruptExportError: If an alias points nowhere, was edited, or differs from its target in shape or dtype.
    """
    for name, entry in entries.items():
        if entry.get("layout") != "alias":
            continue
        target = entry.get("target")
        if not isinstance(target, str) or target not in out:
            raise _error(name, f"alias target {target!r} is not a stored tensor")
        target_entry = entries[target]
        check_entry_seal(name, entry)
        if entry.get("target_sha256") != _target_digest(target_entry):
            raise _error(name, f"alias checksum does not match its target {target!r}: the manifest was edited")
        if entry.get("shape") != target_entry.get("shape") or entry.get("dtype") != target_entry.get("dtype"):
            raise _error(name, f"alias shape/dtype {entry.get('shape')}/{entry.get('dtype')} differ from {target!r}")
        out[name] = out[target]
    return {name: out[name] for name in entries}
