"""Bit-level encodings of sparsity masks: pure, vectorised torch functions with no framework dependency.

Two encodings are used by the export format (see :mod:`wanda_lightning.export`):

* **bitmask**: one bit per weight. Element ``i`` of the row-major flattened mask is bit ``i % 8`` of byte ``i // 8``,
  bit 0 being the least significant ("little" bit order, as ``numpy.packbits(..., bitorder="little")``). Bits past
  the last element are zero.
* **N:M codes**: every group of ``m`` consecutive weights holds exactly ``n`` kept positions, so the group is one of
  ``C(m, n)`` combinations. A group's code is the rank of its kept positions among
  ``itertools.combinations(range(m), n)`` (lexicographic order), and codes are packed in base ``C(m, n)`` into
  little-endian ``int64`` words, ``k`` codes per word where ``k`` is the largest integer with ``C(m, n) ** k <= 2**63``
  (24 for 2:4, so 2.67 bits per group of 4 = 0.67 bit per weight against 1 bit per weight for a bitmask). Code ``j`` of
  a word is ``(word // C ** j) % C``; unused codes of the last word are zero.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "BIT_ORDER",
    "codes_per_word",
    "combination_table",
    "count_nonzero_groups",
    "nm_group_codes",
    "nm_group_masks",
    "pack_bits",
    "pack_radix",
    "popcount",
    "unpack_bits",
    "unpack_radix",
]

BIT_ORDER = "little"
_WORD_LIMIT = 2**63
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8): byte -> its bits


def pack_bits(mask: Tensor) -> Tensor:
    """Packs a boolean tensor into ``ceil(numel / 8)`` bytes, little bit order (see the module docstring).

    Example::

        >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True]))
        tensor([1, 1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)  # (bytes, 8)
    return (groups * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits of ``packed`` as a 1-D boolean tensor.

    Raises:
        ValueError: If ``packed`` does not hold exactly ``ceil(numel / 8)`` bytes, or a padding bit is set.

    Example::

        >>> unpack_bits(torch.tensor([5], dtype=torch.uint8), 3)
        tensor([ True, False,  True])
    """
    expected = (numel + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"a mask of {numel} bits needs {expected} uint8 bytes, got {packed.numel()} of {packed.dtype} "
            f"with shape {tuple(packed.shape)}"
        )
    bits = _BYTE_BITS.to(packed.device).index_select(0, packed.int()).view(-1)  # (bytes * 8,)
    if numel % 8 and bool(bits[numel:].any()):
        raise ValueError(f"padding bits past bit {numel} are set")
    return bits[:numel]


def popcount(packed: Tensor) -> int:
    """Number of set bits in a ``uint8`` tensor.

    Example::

        >>> popcount(torch.tensor([255, 1], dtype=torch.uint8))
        9
    """
    return int(_POPCOUNT.to(packed.device).index_select(0, packed.reshape(-1).int()).sum())


@lru_cache(maxsize=64)
def combination_table(n: int, m: int) -> Tensor:
    """``(C(m, n), m)`` boolean table: row ``r`` marks the positions of the ``r``-th combination, lexicographic order.

    Example::

        >>> combination_table(1, 3).int().tolist()
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    """
    if not 0 <= n <= m <= 16:
        raise ValueError(f"N:M codes need 0 <= N <= M <= 16, got N={n}, M={m}")
    table = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for rank, kept in enumerate(itertools.combinations(range(m), n)):
        table[rank, list(kept)] = True
    return table


@lru_cache(maxsize=64)
def _rank_lookup(n: int, m: int) -> Tensor:
    # Pattern (sum of 1 << position over kept positions) -> rank, -1 for patterns with a kept count other than n.
    table = combination_table(n, m)
    patterns = (table.long() << torch.arange(m)).sum(dim=1)
    lookup = torch.full((1 << m,), -1, dtype=torch.int64)
    lookup[patterns] = torch.arange(table.shape[0])
    return lookup


def nm_group_codes(groups: Tensor, n: int) -> Tensor:
    """Ranks of ``(G, m)`` boolean groups that each hold exactly ``n`` True values.

    Raises:
        ValueError: If a group does not hold exactly ``n`` True values.

    Example::

        >>> nm_group_codes(torch.tensor([[True, True, False, False], [False, False, True, True]]), 2).tolist()
        [0, 5]
    """
    m = groups.shape[1]
    lookup = _rank_lookup(n, m).to(groups.device)
    small = torch.int32 if m > 8 else torch.uint8
    weights = (torch.ones(m, dtype=torch.int32) << torch.arange(m, dtype=torch.int32)).to(small).to(groups.device)
    patterns = (groups.to(small) * weights).sum(dim=1, dtype=small)  # (G,): bit j set when position j is kept
    codes = lookup.index_select(0, patterns.int())
    if bool((codes < 0).any()):
        raise ValueError(f"every group of {m} must keep exactly {n} positions")
    return codes


def nm_group_masks(codes: Tensor, n: int, m: int) -> Tensor:
    """Inverse of :func:`nm_group_codes`: ``(G,)`` ranks to ``(G, m)`` boolean groups.

    Raises:
        ValueError: If a code is not below ``C(m, n)``.

    Example::

        >>> nm_group_masks(torch.tensor([0, 5]), 2, 4).int().tolist()
        [[1, 1, 0, 0], [0, 0, 1, 1]]
    """
    table = combination_table(n, m).to(codes.device)
    try:
        return table.index_select(0, codes)
    except (IndexError, RuntimeError):
        raise ValueError(f"an N:M code is outside [0, {table.shape[0]})") from None


def codes_per_word(base: int) -> int:
    """How many base-``base`` digits fit in one non-negative ``int64`` word (0 when ``base`` is 1: nothing to store).

    Example::

        >>> codes_per_word(6), codes_per_word(70), codes_per_word(2)
        (24, 10, 63)
    """
    if base < 1:
        raise ValueError(f"`base` must be a positive integer, got {base}")
    if base == 1:
        return 0
    k = 0
    while base ** (k + 1) <= _WORD_LIMIT:
        k += 1
    return k


def pack_radix(codes: Tensor, base: int) -> Tensor:
    """Packs ``codes`` (each in ``[0, base)``) into ``int64`` words, :func:`codes_per_word` codes per word.

    Example::

        >>> pack_radix(torch.tensor([1, 2, 3]), 6).tolist()  # 1 + 2 * 6 + 3 * 36
        [121]
    """
    per_word = codes_per_word(base)
    if per_word == 0:
        return torch.zeros(0, dtype=torch.int64, device=codes.device)
    flat = codes.reshape(-1).long()
    pad = (-flat.numel()) % per_word
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    digits = flat.view(-1, per_word)  # (words, per_word); digit j has weight base ** j
    words = digits[:, -1].clone()
    for j in range(per_word - 2, -1, -1):
        words.mul_(base).add_(digits[:, j])
    return words


def unpack_radix(words: Tensor, base: int, count: int) -> Tensor:
    """Inverse of :func:`pack_radix`: the first ``count`` codes.

    Raises:
        ValueError: If the number of words is wrong, a word is out of range, or an unused code is not zero.

    Example::

        >>> unpack_radix(torch.tensor([121]), 6, 3).tolist()
        [1, 2, 3]
    """
    per_word = codes_per_word(base)
    if per_word == 0:
        if words.numel():
            raise ValueError(f"base {base} stores no word, got {words.numel()}")
        return torch.zeros(count, dtype=torch.int64, device=words.device)
    expected = (count + per_word - 1) // per_word
    if words.dtype != torch.int64 or words.dim() != 1 or words.numel() != expected:
        raise ValueError(
            f"{count} codes in base {base} need {expected} int64 words, got {words.numel()} of {words.dtype} "
            f"with shape {tuple(words.shape)}"
        )
    if words.numel() and int(words.min()) < 0:
        raise ValueError("a code word is negative")
    if base**per_word < _WORD_LIMIT and words.numel() and int(words.max()) >= base**per_word:
        raise ValueError(f"a code word is not below {base}**{per_word}")
    rest = words.clone()
    digits = torch.empty(words.numel(), per_word, dtype=torch.int64, device=words.device)
    for j in range(per_word):
        digits[:, j] = rest % base
        rest.floor_divide_(base)
    flat = digits.reshape(-1)
    if bool(flat[count:].any()):
        raise ValueError(f"unused codes past code {count} are not zero")
    return flat[:count]


def count_nonzero_groups(mask: Tensor, m: int) -> Tensor:
    """Number of True values in each group of ``m`` consecutive entries along the last dim, as ``uint8``.

    Args:
        mask: ``(rows, cols)`` boolean tensor with ``cols`` a multiple of ``m``; ``m`` a power of two up to 16.

    Returns:
        ``(rows, cols // m)`` counts.

    Example::

        >>> count_nonzero_groups(torch.tensor([[True, False, True, True]]), 2).tolist()
        [[1, 2]]
    """
    if m < 1 or m & (m - 1) or m > 128:
        raise ValueError(f"`m` must be a power of two up to 128, got {m}")
    counts = mask.to(torch.uint8)
    width = 1
    while width < m:
        counts = counts[..., 0::2] + counts[..., 1::2]
        width *= 2
    return counts
