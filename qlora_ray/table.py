"""Fixed-width text tables: `plan`'s and the `run` summary (pure)."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def line(cells: Sequence[str], widths: Sequence[int], right: Collection[int] = ()) -> str:
    """One row: each cell padded to its column's width (columns in `right` right-aligned)."""
    return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """Header, a rule of dashes, then the rows; each column as wide as its widest cell."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return [line(header, widths, right), "  ".join("-" * w for w in widths),
            *(line(r, widths, right) for r in rows)]
