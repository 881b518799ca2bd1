"""The report for people: its layer table at any width, Markdown, CSV and JSON.

Counting lives in :mod:`xsurgery.analysis`; this module only reads a report's fields, so it
works on a :class:`~xsurgery.analysis.Report` rebuilt from JSON as well.

Width: a table is laid out for a target width (the terminal's; in a pipe or file ``COLUMNS``
or 80, rich's convention; ``width=0``: no limit, every column). Names are never cut: less
important columns are merged, moved into notes under the table, then dropped, in a fixed order
until the table fits, and the notes say what went where. A table that still does not fit runs
past the width instead of being cut (a pipe never cuts anything).

Collapsing: layers identical in everything shown but their name (the spectral gap, which
depends on each graph's seed, is shown as a range) whose names differ in one numeric part
collapse into one row, ``layer3.[1-5].conv2  x5``, once a table has more than ``max_rows``
rows (default :data:`DEFAULT_MAX_ROWS`). A layer that differs in anything shown is never
folded into another; an explicit ``max_rows`` also cuts the middle of what is left.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._util.table import (
    FORMATS,
    Grid,
    _before_after,
    _console,
    _print_note,
    _ratio,
    emit_grid,
    emit_json,
    fit_grid,
    human,
    print_grid,
)
from .._util.table import collapse_rows as _collapse
from .._util.text import safe_text

if TYPE_CHECKING:
    from ._count import LayerRow

# xsurgery.analysis.Report (not imported: analysis renders through this module)
Report = Any

__all__ = [
    "DEFAULT_MAX_ROWS",
    "FORMATS",
    "Grid",
    "collapse_rows",
    "emit_grid",
    "emit_json",
    "fit_grid",
    "human",
    "render_report",
    "report_csv",
    "report_markdown",
]

DEFAULT_MAX_ROWS = 40


def _signature(r: LayerRow) -> tuple:
    """Everything shown about a row except its name and spectral gap (seed-dependent)."""
    return (r.kind, r.converted, r.reason, r.in_channels, r.out_channels, tuple(r.kernel or ()), r.degree,
            r.blocks, r.graph, r.params_before, r.params_after, r.macs_before, r.macs_after,
            r.executed_macs, r.execution, r.mixing, r.calls, r.projected, r.note, r.precision)


def collapse_rows(rows: Sequence[Any], signature: Callable[[Any], tuple] = _signature,
                  name: Callable[[Any], str] = lambda r: r.name) -> list[tuple[str, list[Any]]]:
    """:func:`xsurgery._util.table.collapse_rows` with the report's row signature (everything shown)."""
    return _collapse(rows, signature, name)


# --------------------------------------------------------------------------- the report table

# Shrink steps, applied cumulatively until the table fits: merge first, move to notes, then
# drop the least important columns. The layer name, params and MACs are never dropped.
_STEPS: tuple[str, ...] = ("merge_kind", "merge_dg", "uniform_to_notes", "reason_to_notes", "drop_chans",
                           "mark_exec", "drop_gap", "drop_graph", "drop_dg", "params_after_only", "drop_kind",
                           "macs_after_only")


def _reason(r: LayerRow) -> str:
    reason = r.reason or r.note or ("not run" if r.calls == 0 and not r.projected else "")
    return f"{reason} (planned)".strip() if r.projected else reason


def _kind_kernel(r: LayerRow) -> str:
    if not r.kernel:
        return r.kind
    k = "x".join(map(str, r.kernel))
    return k if r.kind in ("conv", "pointwise") else f"{r.kind} {k}"


def _gap(members: list[LayerRow]) -> str:
    gaps = [m.spectral_gap for m in members if m.spectral_gap is not None]
    if not gaps:
        return ""
    lo, hi = f"{min(gaps):.2f}", f"{max(gaps):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _names(labels: list[str], limit: int = 4) -> str:
    return ", ".join(labels[:limit]) + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _report_grid(rep: Report, groups: list[tuple[str, list[LayerRow]]], flags: set[str]) -> Grid:
    rows = [g[1][0] for g in groups]
    known = rep.macs_known
    graphs = any(r.degree is not None for r in rows)
    execs = {r.execution for r in rows if r.execution}
    graph_names = {r.graph for r in rows if r.graph}
    cols: list[tuple[str, Callable[[str, list[LayerRow]], str], bool]] = []  # header, cell, right
    notes: list[str] = []
    left_out: list[str] = []

    def add(header: str, fn: Callable[[str, list[LayerRow]], str], right: bool = False) -> None:
        cols.append((header, fn, right))

    add("layer", lambda label, m: label + (f"  x{len(m)}" if len(m) > 1 else ""))
    if "drop_kind" in flags:
        left_out.append("kind")
    elif "merge_kind" in flags:
        add("kind", lambda _, m: _kind_kernel(m[0]))
    else:
        add("kind", lambda _, m: m[0].kind)
    if "drop_chans" in flags:
        left_out.append("C_in→C_out")
    else:
        add("C_in→C_out", lambda _, m: f"{m[0].in_channels}→{m[0].out_channels}"
            if m[0].in_channels is not None else "", True)
    if "merge_kind" not in flags:
        add("kernel", lambda _, m: "x".join(map(str, m[0].kernel)) if m[0].kernel else "")
    to_notes = "uniform_to_notes" in flags
    precs = {r.precision or "float" for _, ms in groups for r in ms}
    if precs != {"float"}:  # a quantized file: each layer's precision (QDQ around its node)
        if len(precs) == 1 and to_notes:
            notes.append(f"precision: {next(iter(precs))} (every counted layer: weights and inputs quantized)")
        else:
            add("dtype", lambda _, m: m[0].precision or "float")
    if graphs:
        if "drop_dg" in flags:
            left_out.append("D, G")
        elif "merge_dg" in flags:
            add("D/G", lambda _, m: f"{m[0].degree}/{m[0].blocks}" if m[0].degree is not None else "", True)
        else:
            add("D", lambda _, m: "" if m[0].degree is None else str(m[0].degree), True)
            add("G", lambda _, m: "" if m[0].blocks is None else str(m[0].blocks), True)
        if len(graph_names) == 1 and to_notes:
            notes.append(f"graph: {next(iter(graph_names))} (every converted layer)")
        elif "drop_graph" in flags:
            left_out.append("graph")
        else:
            add("graph", lambda _, m: m[0].graph or "")
        if "drop_gap" in flags:
            gaps = [r.spectral_gap for _, ms in groups for r in ms if r.spectral_gap is not None]
            if gaps:
                notes.append(f"spectral gap: {min(gaps):.3f} to {max(gaps):.3f} over the converted layers")
        else:
            add("gap", lambda _, m: _gap(m), True)
        if any(r.mixing is not None and r.mixing < 2 for _, ms in groups for r in ms if r.degree is not None):
            notes.append("gap 0 at mixing 1: a layer alone does not mix its blocks; consecutive layers do "
                         "(--mixing 2: an expander at every layer)")
    mark = "mark_exec" in flags and known
    if execs and not mark:
        if len(execs) == 1 and to_notes:
            notes.append(f"execution: {next(iter(execs))} (every converted layer)")
        else:
            add("exec", lambda _, m: m[0].execution or "")
    p_after = "params_after_only" in flags
    m_after = "macs_after_only" in flags
    add("params" if not p_after else "params after",
        lambda _, m: _before_after(m[0].params_before, m[0].params_after, p_after), True)

    def macs(_: str, m: list[LayerRow]) -> str:
        r = m[0]
        text = _before_after(r.macs_before, r.macs_after, m_after)
        if mark and r.execution:
            text += "*" if r.execution == "masked" else " "
        return text

    if known:  # no example input: no MACs column (the notes say so)
        add("MACs" if not m_after else "MACs after", macs, True)
    if execs and known and not mark:
        add("exec MACs", lambda _, m: human(m[0].executed_macs) if m[0].execution else "", True)
    if "reason_to_notes" in flags:
        why: dict[str, list[str]] = {}
        for label, ms in groups:
            if _reason(ms[0]) and not ms[0].converted:
                why.setdefault(_reason(ms[0]), []).append(label)
        notes += [f"kept dense, {reason}: {_names(labels)}" for reason, labels in why.items()]
    else:
        add("reason", lambda _, m: _reason(m[0]))

    title = f"{rep.model} @ {'x'.join(str(v) for v in rep.input_size) or 'no input'}"
    if rep.batch != 1:
        title += f", batch {rep.batch}"
    headers = [c[0] for c in cols]
    cells = [[fn(label, members) for _, fn, _ in cols] for label, members in groups]
    styles = ["green" if members[0].converted else None for _, members in groups]
    if mark and len(execs) == 1:
        notes.append(f"execution: {next(iter(execs))} (every converted layer)")
    elif mark and execs:
        notes.append("MACs*: runs masked (the dense layer on a zero-filled weight): computes the before MACs")
    elif execs and known:
        notes.append("exec MACs: what each X-layer's execution computes (masked runs the dense MACs)")
    if p_after or m_after:
        left_out.append("before values (see totals)")
    if left_out:
        notes.append("left out at this width: " + ", ".join(left_out) + " (--width 0, --format csv or json: all)")
    return Grid(headers, cells, frozenset(c[0] for c in cols if c[2]), styles, title, notes)


def _groups_for(rep: Report, max_rows: int | None,
                show_all: bool) -> tuple[list[tuple[str, list[LayerRow]]], int, int]:
    """The rows to show (collapsed when there are more than ``max_rows``), how many layers
    collapsing folded into others' rows, and how many rows an explicit ``max_rows`` cut."""
    rows = [(r.name or "(model)", [r]) for r in rep.layers]
    limit = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    if show_all or len(rows) <= limit:
        return rows, 0, 0
    groups = collapse_rows(rep.layers)
    folded = len(rows) - len(groups)
    if max_rows is None or len(groups) <= max_rows:
        return groups, folded, 0
    head = (max_rows + 1) // 2
    tail = max_rows - head
    return groups[:head] + (groups[-tail:] if tail else []), folded, len(groups) - head - tail


def _totals_grid(rep: Report) -> Grid:
    t = rep.totals
    rows = []
    for label, b, a in (("params", t["params_before"], t["params_after"]),
                        ("MACs", t["macs_before"], t["macs_after"]),
                        ("exec MACs", t["macs_before"], t.get("macs_executed")),
                        ("FLOPs", t["flops_before"], t["flops_after"])):
        if b is None:
            continue  # no example input: said under the table
        r = _ratio(b, a)
        rows.append([label, human(b, spaced=True), human(a, spaced=True), "" if r is None else f"{r:.2f}x"])
    return Grid(["totals", "before", "after", "reduction"], rows, frozenset({"before", "after", "reduction"}))


def _summary(rep: Report, folded: int, cut: int) -> list[str]:
    t = rep.totals
    lines = [f"{t['converted_layers']} of {len(rep.layers)} counted layers converted; FLOPs = 2 x MACs"]
    if not rep.macs_known:
        lines.append("MACs: none counted; give an example input for MACs (--input-size, --input)")
    if folded:
        lines.append(f"xN: N identical layers in one row, per-layer values ({folded} rows folded; --all: every layer)")
    if cut:
        lines.append(f"... {cut} more rows not shown (--max-rows; --all: every layer)")
    if rep.trace_error and rep.method not in (None, "fx"):
        lines.append(f"note: torch.fx could not trace this model ({rep.trace_error}); layers were swapped by name")
    empty = [r.name for r in rep.layers if r.note and "ran on 0 rows" in r.note]
    if empty and rep.macs_known:
        on = ", ".join(f"{i['name']} {list(i['shape'])}" for i in rep.inputs or []) or f"input {list(rep.input_size)}"
        lines.append(f"MACs depend on the input's values: counted on the example ({on}), on which {len(empty)} layers "
                     f"ran on 0 rows (a value-dependent path, e.g. a detection head without proposals), so count 0 "
                     f"MACs; other inputs run them on more rows: {_names(empty)}")
    return lines


def _projection_grid(rep: Report) -> Grid | None:
    """init="project": each converted layer's relative output error on the calibration data."""
    p = rep.projection
    if not p:
        return None

    def pct(v: Any) -> str:
        return "" if v is None else f"{100 * v:.2f}%"

    rows = [[safe_text(r["name"], 1 << 12), pct(r.get("keep_error")), pct(r.get("project_error")), str(r.get("rows", ""))]
            for r in p.get("layers", [])]
    note = (f"init=project: relative output error ||Y_x - Y_dense|| / ||Y_dense|| of each layer on the dense "
            f"model's inputs, {p.get('batches')} {p.get('data', 'calibration')} batch(es), ridge {p.get('ridge'):g}")
    return Grid(["projected layer", "keep error", "project error", "rows"], rows,
                frozenset({"keep error", "project error", "rows"}), [], None, [note])


def _layouts(rep: Report, groups: list[tuple[str, list[LayerRow]]]) -> list[Grid]:
    return [_report_grid(rep, groups, set(_STEPS[:step])) for step in range(len(_STEPS) + 1)]


def render_report(rep: Report, console=None, max_rows: int | None = None, *, show_all: bool = False,
                  width: int | None = None, fmt: str = "table") -> None:
    """Print a report: the layer table, the totals and notes.

    Args:
        rep: the report.
        console: a ``rich.console.Console`` (default: a new one on stdout).
        max_rows: collapse repeated identical layers when there are more rows than this
            (default :data:`DEFAULT_MAX_ROWS`), and cut the middle of what is still over it
            when given explicitly.
        show_all: every layer, never collapsed.
        width: the width to fit (default: the console's, which in a pipe is ``COLUMNS``
            or 80); ``0``: every column, however wide.
        fmt: ``table``, ``markdown``, ``csv`` or ``json``.
    """
    console = _console(console)
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
    groups, folded, cut = _groups_for(rep, max_rows, show_all)
    target = console.width if width is None else width
    grid = fit_grid(_layouts(rep, groups), target)
    notes, grid.notes = _summary(rep, folded, cut) + grid.notes, []
    print_grid(grid, console, target)
    console.print()
    print_grid(_totals_grid(rep), console, target)
    for note in notes:
        _print_note(console, note, target)
    proj = _projection_grid(rep)
    if proj is not None:
        console.print()
        notes, proj.notes = proj.notes, []
        print_grid(proj, console, target)
        for note in notes:
            _print_note(console, note, target)


def report_markdown(rep: Report, max_rows: int | None = None, show_all: bool = False) -> str:
    """The report as Markdown: a title line, the full layer table, the totals and notes."""
    groups, folded, cut = _groups_for(rep, max_rows, show_all)
    grid = _report_grid(rep, groups, set())
    out = [f"**{safe_text(grid.title or '', 1 << 12)}**", "", grid.markdown(), "", _totals_grid(rep).markdown(), ""]
    out += [f"{safe_text(line, 1 << 12)}  " for line in _summary(rep, folded, cut) + grid.notes]
    proj = _projection_grid(rep)
    if proj is not None:
        out += ["", proj.markdown(), "", *[f"{safe_text(line, 1 << 12)}  " for line in proj.notes]]
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
        if not rep.macs_known:
            d["macs_before"] = d["macs_after"] = d["macs_executed"] = None
        w.writerow(["" if d.get(k) is None else safe_text(d[k], 1 << 12) if isinstance(d.get(k), str) else d.get(k)
                    for k in CSV_FIELDS])
    return buf.getvalue()
