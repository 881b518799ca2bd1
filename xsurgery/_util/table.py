"""Tables for people, any command: a :class:`Grid` of strings printed at any width (cells never
cut; columns dropped in a given order until it fits), as Markdown, CSV or JSON, and the one
``--json [FILE]`` convention (stdout, or an atomic write that needs ``--force`` to overwrite).
Rows identical but for one number in their names collapse with :func:`collapse_rows`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .text import safe_text

__all__ = ["FORMATS", "Grid", "collapse_rows", "emit_grid", "emit_json", "fit_grid", "grid_lines", "human",
           "print_grid"]

FORMATS = ("table", "markdown", "csv", "json")
NO_VALUE = "-"
_SEP = "  "


# --------------------------------------------------------------------------- numbers


def human(n: float | None, *, spaced: bool = False) -> str:
    """3 significant digits and a unit: ``25561896 -> '25.6M'`` (``spaced``: ``'25.56 M'``)."""
    if n is None:
        return NO_VALUE
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            if spaced:
                return f"{v:.2f} {unit}"
            digits = max(0, 2 - int(math.floor(math.log10(abs(v)))))
            return f"{v:.{digits}f}{unit}"
    return f"{int(n)}"


def _ratio(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return float(before) / after if after else float("inf") if before else 1.0


def _before_after(b: int | None, a: int | None, after_only: bool = False) -> str:
    if after_only or a == b:
        return human(a)
    return f"{human(b)}→{human(a)}"


# --------------------------------------------------------------------------- generic grid


@dataclass
class Grid:
    """A table of strings: what every output format renders.

    Attributes:
        columns: header texts.
        rows: one list of cells per row (same length as ``columns``).
        right: headers of right-justified columns.
        styles: per row a rich style (``None``: plain); only terminals show them.
        title: shown above a terminal table and as a Markdown caption.
        notes: lines printed under it.
    """

    columns: list[str]
    rows: list[list[str]]
    right: frozenset[str] = frozenset()
    styles: list[str | None] = field(default_factory=list)
    title: str | None = None
    notes: list[str] = field(default_factory=list)

    def widths(self) -> list[int]:
        return [max([_cell_len(h)] + [_cell_len(r[i]) for r in self.rows]) for i, h in enumerate(self.columns)]

    def natural_width(self) -> int:
        """Characters per line when nothing is cut."""
        w = self.widths()
        return sum(w) + len(_SEP) * max(0, len(w) - 1)

    def drop(self, header: str) -> Grid:
        """A copy without the column ``header`` (unchanged if there is none)."""
        if header not in self.columns:
            return self
        i = self.columns.index(header)
        return replace(self, columns=[c for c in self.columns if c != header],
                       rows=[r[:i] + r[i + 1:] for r in self.rows], notes=list(self.notes))

    def markdown(self) -> str:
        """A GitHub Markdown table (``|`` in cells escaped)."""
        esc = [[_esc(c).replace("|", "\\|") for c in row] for row in [self.columns, *self.rows]]
        align = ["---:" if h in self.right else "---" for h in self.columns]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([_esc(c) for c in self.columns])
        w.writerows([[_esc(c) for c in r] for r in self.rows])
        return buf.getvalue()


def _cell_len(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def grid_lines(grid: Grid) -> list[str]:
    """The grid as plain text lines (header, rule, rows), every cell whole."""
    widths = grid.widths()

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if h in grid.right else c.ljust(w) for c, w, h in zip(cells, widths, grid.columns)]
        return _SEP.join(out).rstrip()

    return [line(grid.columns), "─" * grid.natural_width()] + [line(r) for r in grid.rows]


def fit_grid(layouts: Sequence[Grid], width: int | None) -> Grid:
    """The first layout (most detailed first) whose natural width fits ``width`` (``0``/``None``:
    the first), else the narrowest one, which then runs past the width rather than cutting cells."""
    if not width:
        return layouts[0]
    for g in layouts:
        if g.natural_width() <= width:
            return g
    return min(layouts, key=Grid.natural_width)


def _console(console=None):
    from rich.console import Console

    return console or Console()


def _print_line(console, text: str, style: str | None = None, bold: bool = False) -> None:
    from rich.text import Text

    t = Text(_esc(text), style=style or "")
    if bold:
        t.stylize("bold")
    # soft_wrap: no wrapping, no cropping; a line wider than the console runs past it
    console.print(t, soft_wrap=True, no_wrap=True, crop=False, overflow="ignore")


def _print_note(console, note: str, width: int | None) -> None:
    import textwrap

    lines = textwrap.wrap(note, width, subsequent_indent="  ", break_long_words=False,
                          break_on_hyphens=False) if width and width > 20 else [note]
    for line in lines:
        _print_line(console, line)


def _esc(text: Any) -> str:
    """A cell or line with control characters and line breaks escaped, never cut."""
    text = text if isinstance(text, str) else str(text)
    return safe_text(text, max(len(text), 1))


def _escaped(grid: Grid) -> Grid:
    """``grid`` with every cell, header, title and note escaped (names and metadata read from a
    file never put a control character or a line break on the terminal)."""
    esc = _esc

    return replace(grid, columns=[esc(c) for c in grid.columns], rows=[[esc(c) for c in r] for r in grid.rows],
                   title=esc(grid.title) if grid.title else grid.title, notes=[esc(n) for n in grid.notes],
                   right=frozenset(esc(c) for c in grid.right))


def print_grid(grid: Grid, console=None, width: int | None = None) -> None:
    """Print ``grid`` as aligned text (styles on a terminal), then its notes. Nothing is cut."""
    grid = _escaped(grid)
    console = _console(console)
    if grid.title:
        _print_line(console, grid.title, bold=True)
    lines = grid_lines(grid)
    styles = grid.styles or [None] * len(grid.rows)
    _print_line(console, lines[0], bold=True)
    _print_line(console, lines[1])
    for text, style in zip(lines[2:], styles):
        _print_line(console, text, style)
    for note in grid.notes:
        _print_note(console, note, console.width if width is None else width)


def emit_json(data: Any, target: str | None, force: bool = False) -> None:
    """``--json [FILE]``: to stdout for ``-``, else an atomic write (no overwrite without ``force``)."""
    if not target:
        return
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    if target == "-":
        print(text)
        return
    from .io import write_text

    write_text(target, text + "\n", force=force)


def emit_grid(grid: Grid, fmt: str = "table", console=None, width: int | None = None,
              drop_order: Sequence[str] = (), data: Any = None, moved: dict[str, list[str]] | None = None) -> None:
    """Print ``grid`` as ``table`` (dropping ``drop_order`` columns until it fits), ``markdown``,
    ``csv`` or ``json`` (``data``, default the rows as dicts keyed by column).

    ``moved``: per column, the notes that say what it said once it is dropped (those columns
    are not listed as left out)."""
    moved = moved or {}
    grid = _escaped(grid)
    console = _console(console)
    if fmt == "json":
        payload = data if data is not None else [dict(zip(grid.columns, r)) for r in grid.rows]
        console.file.write(json.dumps(payload, indent=2, default=str) + "\n")
        return
    if fmt == "markdown":
        text = (f"**{grid.title}**\n\n" if grid.title else "") + grid.markdown() + "\n"
        console.file.write(text + "".join(f"\n{n}  " for n in grid.notes) + ("\n" if grid.notes else ""))
        return
    if fmt == "csv":
        console.file.write(grid.csv())
        return
    target = console.width if width is None else width
    layouts = [grid]
    dropped: list[str] = []
    extra: list[str] = []
    for col in drop_order:
        if col in layouts[-1].columns:
            if col in moved:
                extra += moved[col]
            else:
                dropped.append(col)
            g = layouts[-1].drop(col)
            g.notes = list(grid.notes) + extra + ([f"left out at this width: {', '.join(dropped)} "
                                                   "(--width 0, --format csv or json: all)"] if dropped else [])
            layouts.append(g)
    print_grid(fit_grid(layouts, target), console, target)


# --------------------------------------------------------------------------- collapsing


def _ranges(values: list[int]) -> str:
    values = sorted(values)
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def collapse_rows(rows: Sequence[Any], signature: Callable[[Any], tuple],
                  name: Callable[[Any], str] = lambda r: r.name) -> list[tuple[str, list[Any]]]:
    """Group rows identical under ``signature`` whose names differ in one numeric part.

    Returns ``(display name, members)`` in the order of each group's first member; a
    group's name has the varying part as ``[1-3,5]``; a row alone keeps its own name.
    Larger groups are formed first; no row is in two groups.
    """
    parts = [name(r).split(".") if name(r) else [] for r in rows]
    candidates: dict[tuple, list[int]] = {}
    for i, (r, p) in enumerate(zip(rows, parts)):
        sig = signature(r)
        for j, comp in enumerate(p):
            if comp.isdigit():
                candidates.setdefault((j, tuple(p[:j]), tuple(p[j + 1:]), sig), []).append(i)
    taken: dict[int, tuple[str, list[int]]] = {}
    owner: set[int] = set()
    for key, members in sorted(candidates.items(), key=lambda kv: (-len(kv[1]), kv[1][0])):
        free = [i for i in members if i not in owner]
        if len(free) < 2:
            continue
        j, head, tail, _ = key
        label = ".".join([*head, f"[{_ranges([int(parts[i][j]) for i in free])}]", *tail])
        owner.update(free)
        taken[free[0]] = (label, free)
    out: list[tuple[str, list[Any]]] = []
    for i, r in enumerate(rows):
        if i in taken:
            label, members = taken[i]
            out.append((label, [rows[k] for k in members]))
        elif i not in owner:
            out.append((name(r) or "(model)", [r]))
    return out
