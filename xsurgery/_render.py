"""Rendering for people: the report's layer table at any width, Markdown and CSV.

Counting lives in :mod:`xsurgery.analysis`; this module only reads a report's fields, so it
works on a :class:`~xsurgery.analysis.Report` rebuilt from JSON as well.

Width: a table is laid out for a target width (the terminal's; in a pipe or file ``COLUMNS``
or 80, rich's convention; ``width=0``: no limit). Layer names are never cut: less important
columns are merged, then dropped, in a fixed order until the table fits, and the table says
which ones it left out. Whatever still does not fit runs past the width instead of being cut.

Collapsing: layers identical in everything but their name (and their graph's seed, so the
spectral gap is shown as a range) whose names differ in one numeric part collapse into one
row, ``layer3.[1-5].conv2  x5``, once a table has more than ``max_rows`` rows (default
:data:`DEFAULT_MAX_ROWS`). A layer that differs in anything shown is never folded away.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analysis import LayerRow, Report

__all__ = [
    "DEFAULT_MAX_ROWS",
    "FORMATS",
    "Grid",
    "collapse_rows",
    "fit_grid",
    "human",
    "print_grid",
    "render_report",
    "report_csv",
    "report_markdown",
]

DEFAULT_MAX_ROWS = 40
FORMATS = ("table", "markdown", "csv", "json")
NO_MACS = "—"
_SEP = 3  # between columns: padding, the box's blank divider, padding


# --------------------------------------------------------------------------- numbers


def human(n: float | None, *, spaced: bool = False) -> str:
    """3 significant digits and a unit: ``25561896 -> '25.6M'`` (``spaced``: ``'25.56 M'``)."""
    if n is None:
        return NO_MACS
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
        styles: per row a rich style (``None``: plain).
        title: shown above a terminal table.
        notes: lines printed under it.
        name_column: the column that is never cut or wrapped (layer names).
    """

    columns: list[str]
    rows: list[list[str]]
    right: frozenset[str] = frozenset()
    styles: list[str | None] = field(default_factory=list)
    title: str | None = None
    notes: list[str] = field(default_factory=list)
    name_column: int = 0

    def natural_width(self) -> int:
        """Characters per line when nothing is cut (3 between columns)."""
        widths = [max([_cell_len(h)] + [_cell_len(r[i]) for r in self.rows]) for i, h in enumerate(self.columns)]
        return sum(widths) + _SEP * max(0, len(widths) - 1)

    def drop(self, header: str) -> Grid:
        """A copy without the column ``header`` (unchanged if there is none)."""
        if header not in self.columns:
            return self
        i = self.columns.index(header)
        return Grid([c for c in self.columns if c != header], [r[:i] + r[i + 1:] for r in self.rows], self.right,
                    self.styles, self.title, list(self.notes), self.name_column - (i < self.name_column))

    def markdown(self) -> str:
        """A GitHub Markdown table (``|`` in cells escaped)."""
        esc = [[c.replace("|", "\\|") for c in row] for row in [self.columns, *self.rows]]
        align = ["---:" if h in self.right else "---" for h in self.columns]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        return "\n".join(lines)


def _cell_len(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def fit_grid(layouts: Sequence[Grid] | Callable[[int], Grid | None], width: int | None) -> Grid:
    """The first layout (most detailed first) whose natural width fits ``width`` (``0``/``None``:
    the first), else the narrowest one, which then runs past the width rather than cutting cells."""
    if callable(layouts):
        seq: list[Grid] = []
        step = 0
        while (g := layouts(step)) is not None:
            seq.append(g)
            step += 1
        layouts = seq
    if not width:
        return layouts[0]
    for g in layouts:
        if g.natural_width() <= width:
            return g
    return min(layouts, key=Grid.natural_width)


def print_grid(grid: Grid, console=None) -> None:
    """Print ``grid`` as a rich table at its natural width: nothing is cut or wrapped."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    natural = grid.natural_width()
    table = Table(title=grid.title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                  collapse_padding=False, header_style="bold", title_justify="left")
    for i, h in enumerate(grid.columns):
        table.add_column(Text(h), justify="right" if h in grid.right else "left", no_wrap=True,
                         overflow="ignore", min_width=None if i != grid.name_column else
                         max([_cell_len(h)] + [_cell_len(r[i]) for r in grid.rows]))
    styles = grid.styles or [None] * len(grid.rows)
    for row, style in zip(grid.rows, styles):
        table.add_row(*[Text(c) for c in row], style=style)
    # the table's own width, never less: a narrower console would cut cells
    width = max(console.width, natural + 2 * len(grid.columns))
    console.print(table, width=width, crop=False)
    _print_notes(grid.notes, console)


# --------------------------------------------------------------------------- collapsing


def _signature(r: LayerRow) -> tuple:
    """Everything shown about a row except its name and spectral gap (seed-dependent)."""
    return (r.kind, r.converted, r.reason, r.in_channels, r.out_channels, tuple(r.kernel or ()), r.degree,
            r.blocks, r.graph, r.params_before, r.params_after, r.macs_before, r.macs_after,
            getattr(r, "macs_executed", None), getattr(r, "execution", None), r.mixing, r.calls, r.projected,
            r.note)


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


def collapse_rows(rows: Sequence[Any], signature: Callable[[Any], tuple] = _signature,
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


# --------------------------------------------------------------------------- the report table

# Shrink steps, applied cumulatively until the table fits: merge first, then drop the least
# important columns. The layer name, params and MACs are never dropped.
_STEPS: tuple[str, ...] = ("merge_kind", "merge_dg", "drop_uniform_graph", "drop_chans", "star_exec", "drop_graph",
                           "drop_gap", "drop_dg", "after_only", "drop_reason")


def _reason(r: LayerRow) -> str:
    reason = r.reason or r.note or ("not run" if r.calls == 0 and not r.projected else "")
    return f"{reason} (planned)".strip() if r.projected else reason


def _kind_kernel(r: LayerRow) -> str:
    if not r.kernel:
        return r.kind
    k = "x".join(map(str, r.kernel))
    if r.kind == "pointwise":
        return "1x1" if k == "1x1" else f"pw {k}"
    if r.kind == "conv":
        return k
    return f"{r.kind} {k}"


def _gap(members: list[LayerRow]) -> str:
    gaps = [m.spectral_gap for m in members if m.spectral_gap is not None]
    if not gaps:
        return ""
    lo, hi = min(gaps), max(gaps)
    return f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.2f}-{hi:.2f}"


def _executed(r: LayerRow) -> int | None:
    x = getattr(r, "macs_executed", None)
    return r.macs_after if x is None else x


def _report_grid(rep: Report, groups: list[tuple[str, list[LayerRow]]], flags: set[str]) -> Grid:
    rows = [g[1][0] for g in groups]
    graphs = any(r.degree is not None for r in rows)
    runs = any(getattr(r, "execution", None) for r in rows)
    graph_names = {r.graph for r in rows if r.graph}
    cols: list[tuple[str, Callable[[str, list[LayerRow]], str], bool]] = []  # header, cell, right

    def add(header: str, fn: Callable[[str, list[LayerRow]], str], right: bool = False) -> None:
        cols.append((header, fn, right))

    add("layer", lambda label, m: label + (f"  x{len(m)}" if len(m) > 1 else ""))
    if "merge_kind" in flags:
        add("kind", lambda _, m: _kind_kernel(m[0]))
    else:
        add("kind", lambda _, m: m[0].kind)
    if "drop_chans" not in flags:
        add("C_in→C_out", lambda _, m: f"{m[0].in_channels}→{m[0].out_channels}"
            if m[0].in_channels is not None else "", True)
    if "merge_kind" not in flags:
        add("kernel", lambda _, m: "x".join(map(str, m[0].kernel)) if m[0].kernel else "")
    notes: list[str] = []
    left_out: list[str] = []
    if graphs:
        if "drop_dg" in flags:
            left_out.append("D, G")
        elif "merge_dg" in flags:
            add("D/G", lambda _, m: f"{m[0].degree}/{m[0].blocks}" if m[0].degree is not None else "", True)
        else:
            add("D", lambda _, m: "" if m[0].degree is None else str(m[0].degree), True)
            add("G", lambda _, m: "" if m[0].blocks is None else str(m[0].blocks), True)
        uniform = len(graph_names) == 1
        if "drop_graph" in flags or ("drop_uniform_graph" in flags and uniform):
            if uniform:
                notes.append(f"graph: {next(iter(graph_names))} (every converted layer)")
            else:
                left_out.append("graph")
        else:
            add("graph", lambda _, m: m[0].graph or "")
        if "drop_gap" in flags:
            gaps = [r.spectral_gap for _, ms in groups for r in ms if r.spectral_gap is not None]
            if gaps:
                left_out.append(f"gap ({min(gaps):.2f}-{max(gaps):.2f})")
        else:
            add("gap", lambda _, m: _gap(m), True)
    if runs and "star_exec" not in flags:
        add("run", lambda _, m: getattr(m[0], "execution", None) or "")
    after_only = "after_only" in flags
    add("params" if not after_only else "params after",
        lambda _, m: _before_after(m[0].params_before, m[0].params_after, after_only), True)
    add("MACs" if not after_only else "MACs after",
        lambda _, m: _before_after(m[0].macs_before, m[0].macs_after, after_only), True)
    if runs:
        star = "star_exec" in flags

        def run_macs(_: str, m: list[LayerRow]) -> str:
            r = m[0]
            ex = getattr(r, "execution", None)
            if not ex:
                return ""
            return human(_executed(r)) + ("*" if star and ex == "masked" else " " if star else "")

        add("run MACs", run_macs, True)
    if "drop_reason" not in flags:
        add("reason", lambda _, m: _reason(m[0]))

    title = f"{rep.model} @ {'x'.join(str(v) for v in rep.input_size)}"
    if rep.batch != 1:
        title += f", batch {rep.batch}"
    headers = [c[0] for c in cols]
    cells = [[fn(label, members) for _, fn, _ in cols] for label, members in groups]
    styles = ["green" if members[0].converted else None for _, members in groups]
    if runs:
        notes.append("run MACs: what each X-layer's execution computes"
                     + (" (* masked: a dense conv, so the dense MACs)" if "star_exec" in flags else
                        " (masked runs the dense MACs)"))
    if after_only:
        left_out.append("before values (see totals)")
    if left_out:
        notes.append("left out at this width: " + ", ".join(left_out) + " (--width 0, --format csv or --json: all)")
    return Grid(headers, cells, frozenset(c[0] for c in cols if c[2]), styles, title, notes)


def _groups_for(rep: Report, max_rows: int | None, show_all: bool) -> list[tuple[str, list[LayerRow]]]:
    limit = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    if show_all or len(rep.layers) <= limit:
        return [(r.name or "(model)", [r]) for r in rep.layers]
    return collapse_rows(rep.layers)


def _totals_grid(rep: Report) -> Grid:
    t = rep.totals
    rows = []
    for label, key in (("params", "params"), ("MACs", "macs"), ("run MACs", "macs_executed"), ("FLOPs", "flops")):
        b = t.get(f"{key}_before") if key != "macs_executed" else t.get("macs_before")
        a = t.get(f"{key}_after") if key != "macs_executed" else t.get("macs_executed")
        if key == "macs_executed" and a is None:
            continue
        r = _ratio(b, a)
        rows.append([label, human(b, spaced=True), human(a, spaced=True), "" if r is None else f"{r:.2f}x"])
    return Grid(["totals", "before", "after", "reduction"], rows, frozenset({"before", "after", "reduction"}))


def _summary(rep: Report, collapsed: int) -> list[str]:
    t = rep.totals
    lines = [f"{t['converted_layers']} of {len(rep.layers)} counted layers converted; FLOPs = 2 x MACs"]
    if any(r.macs_after is None for r in rep.layers):
        lines.append(f"MACs {NO_MACS}: give an example input for MACs")
    if collapsed:
        lines.append(f"xN: N identical layers in one row, per-layer values ({collapsed} rows folded; "
                     "--all lists every layer)")
    return lines


def render_report(rep: Report, console=None, max_rows: int | None = None, *, show_all: bool = False,
                  width: int | None = None, fmt: str = "table") -> None:
    """Print a report: the layer table, the totals and notes.

    Args:
        rep: the report.
        console: a ``rich.console.Console`` (default: a new one on stdout).
        max_rows: collapse repeated identical layers when there are more rows than this
            (default :data:`DEFAULT_MAX_ROWS`); nothing that differs is ever hidden.
        show_all: never collapse.
        width: the width to fit (default: the console's, which in a pipe is ``COLUMNS``
            or 80); ``0``: every column, however wide.
        fmt: ``table``, ``markdown``, ``csv`` or ``json``.
    """
    from rich.console import Console

    console = console or Console()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "json":
        console.file.write(rep.to_json() + "\n")
        return
    if fmt == "csv":
        console.file.write(report_csv(rep))
        return
    if fmt == "markdown":
        console.file.write(report_markdown(rep, max_rows=max_rows, show_all=show_all) + "\n")
        return
    groups = _groups_for(rep, max_rows, show_all)
    target = console.width if width is None else width

    def layout(step: int) -> Grid | None:
        if step > len(_STEPS):
            return None
        return _report_grid(rep, groups, set(_STEPS[:step]))

    grid = fit_grid(layout, target)
    grid.notes = _summary(rep, len(rep.layers) - len(groups)) + grid.notes
    if rep.trace_error and rep.method not in (None, "fx"):
        grid.notes.append(f"torch.fx could not trace this model ({rep.trace_error}); layers were swapped by name")
    notes, grid.notes = grid.notes, []
    print_grid(grid, console)
    print_grid(_totals_grid(rep), console)
    _print_notes(notes, console)


def _print_notes(notes: Sequence[str], console) -> None:
    from rich.text import Text

    for note in notes:
        console.print(Text(note), width=max(console.width, _cell_len(note)), crop=False)


def report_markdown(rep: Report, max_rows: int | None = None, show_all: bool = False) -> str:
    """The report as Markdown: a title line, the full layer table and the totals."""
    groups = _groups_for(rep, max_rows, show_all)
    grid = _report_grid(rep, groups, set())
    out = [f"**{grid.title}**", "", grid.markdown(), "", _totals_grid(rep).markdown(), ""]
    out += [f"{line}  " for line in _summary(rep, len(rep.layers) - len(groups)) + grid.notes]
    return "\n".join(out).rstrip()


CSV_FIELDS = ("name", "kind", "converted", "reason", "in_channels", "out_channels", "kernel", "degree", "blocks",
              "graph", "spectral_gap", "execution", "params_before", "params_after", "macs_before", "macs_after",
              "macs_executed", "calls", "note")


def report_csv(rep: Report) -> str:
    """One CSV row per layer (never collapsed), raw numbers; the kernel as ``3x3``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rep.layers:
        d = r.to_dict()
        d["kernel"] = "x".join(map(str, d["kernel"])) if d.get("kernel") else ""
        w.writerow(["" if d.get(k) is None else d.get(k) for k in CSV_FIELDS])
    return buf.getvalue()


def grid_csv(grid: Grid) -> str:
    """Any grid as CSV (header row first)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(grid.columns)
    w.writerows(grid.rows)
    return buf.getvalue()


def emit_grid(grid: Grid, fmt: str, console=None, width: int | None = None,
              drop_order: Sequence[str] = ()) -> None:
    """Print ``grid`` as ``table`` (dropping ``drop_order`` columns until it fits), ``markdown`` or ``csv``."""
    from rich.console import Console

    console = console or Console()
    if fmt == "markdown":
        console.file.write(grid.markdown() + "\n")
        for note in grid.notes:
            console.file.write(note + "  \n")
        return
    if fmt == "csv":
        console.file.write(grid_csv(grid))
        return
    target = console.width if width is None else width
    layouts = [grid]
    dropped: list[str] = []
    for col in drop_order:
        if col in layouts[-1].columns:
            dropped.append(col)
            g = layouts[-1].drop(col)
            g.notes = [n for n in grid.notes] + [f"left out at this width: {', '.join(dropped)} "
                                                  "(--width 0, --format csv or --json: all)"]
            layouts.append(g)
    print_grid(fit_grid(layouts, target), console)
