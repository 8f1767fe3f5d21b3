"""Plain-text layout of reports: aligned ``key  value`` summaries and column-aligned tables."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_pairs", "format_table"]


def format_pairs(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One line per ``(key, value)``, the values aligned two spaces after the longest key.

    Example::

        >>> print("\\n".join(format_pairs([("method", "wanda"), ("mode", "one-shot")])))
        method  wanda
        mode    one-shot
    """
    width = max((len(key) for key, _ in pairs), default=0)
    return [f"{key:<{width}}  {value}" for key, value in pairs]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a table: the header, a rule of dashes, then the rows; the first column left-aligned, the others
    right-aligned, columns two spaces apart.

    Example::

        >>> print("\\n".join(format_table(("layer", "units"), [("fc1", "8 -> 4")])))
        layer   units
        -----  ------
        fc1    8 -> 4
    """
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
