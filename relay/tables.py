"""Plain-text tables: the demo's report, the operator commands and the benchmarks' results.

One layout for all of them: every column as wide as its widest cell, two spaces between
columns, text left-aligned and numbers right-aligned. The callers differ only in the frame:

- ``text_table``: the bare columns (``relay status``, ``relay inspect``), optionally indented
  and with a rule of dashes under the header (the demo);
- ``markdown_table``: a GitHub-flavoured Markdown table, readable as plain text too (the
  benchmarks, whose output is pasted into bench/README.md).

Which columns are right-aligned is either named by the caller (``right``: column indexes) or
found from the data: a column is numeric when every cell is a number, text that reads as a
non-negative decimal number (``"200"``, ``"1.5"``), or empty.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

Cell = Callable[[object], str]


def plain_cell(value: object) -> str:
    """A cell's text: ``str(value)``, and nothing for None."""
    return "" if value is None else str(value)


def text_table(
    headers: Sequence[str] | None,
    rows: Iterable[Sequence[object]],
    *,
    right: Collection[int] | None = None,
    indent: str = "",
    rule: bool = False,
    empty: str | None = None,
    cell: Cell = plain_cell,
) -> list[str]:
    """The table's lines: the header (unless None), a rule of dashes under it (``rule``), the
    rows, or ``empty`` in place of the rows when there are none. Each line starts with
    ``indent`` and has no trailing blanks."""
    layout = _Layout(headers, rows, right, cell)

    def line(values: Sequence[str]) -> str:
        return (indent + "  ".join(layout.pad(values))).rstrip()

    out = [] if headers is None else [line(headers)]
    if rule:
        out.append(line(["-" * w for w in layout.widths]))
    out += [line(r) for r in layout.cells]
    if not layout.cells and empty is not None:
        out.append(indent + empty)
    return out


def markdown_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    right: Collection[int] | None = None,
    cell: Cell = plain_cell,
) -> list[str]:
    """A GitHub-flavoured Markdown table's lines; the rule marks right-aligned columns
    (``---:``) so that rendered Markdown aligns them as the text does."""
    layout = _Layout(headers, rows, right, cell)

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(layout.pad(values)) + " |"

    rule = "|".join(
        "-" * (w + 1) + ":" if r else "-" * (w + 2)
        for w, r in zip(layout.widths, layout.right, strict=True)
    )
    return [line(headers), f"|{rule}|", *(line(r) for r in layout.cells)]


def is_numeric(value: object) -> bool:
    """Whether a cell holding ``value`` is right-aligned in a column found from the data."""
    if value is None or isinstance(value, int | float):
        return True
    if isinstance(value, str):
        return value == "" or value.replace(".", "", 1).isdigit()
    return False


class _Layout:
    """The cells as text, each column's width and alignment."""

    def __init__(
        self,
        headers: Sequence[str] | None,
        rows: Iterable[Sequence[object]],
        right: Collection[int] | None,
        cell: Cell,
    ) -> None:
        values = [list(r) for r in rows]
        self.cells = [[cell(v) for v in row] for row in values]
        lines = self.cells if headers is None else [list(headers), *self.cells]
        columns = len(lines[0]) if lines else 0
        for n, line in enumerate(lines):
            if len(line) != columns:
                raise ValueError(f"table row {n} has {len(line)} cells, expected {columns}")
        self.widths = [max(len(line[i]) for line in lines) for i in range(columns)]
        if right is None:
            self.right = [all(is_numeric(row[i]) for row in values) for i in range(columns)]
        else:
            self.right = [i in right for i in range(columns)]

    def pad(self, values: Sequence[str]) -> list[str]:
        return [
            v.rjust(w) if r else v.ljust(w)
            for v, w, r in zip(values, self.widths, self.right, strict=True)
        ]
