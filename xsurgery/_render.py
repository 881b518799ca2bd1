"""Rendering of reports and tables for people: rich tables, Markdown, CSV (counting lives in
:mod:`xsurgery.analysis`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analysis import Report


def render_report(rep: Report, console=None, max_rows: int | None = None) -> None:
    """Print the layer table and the totals with ``rich``.

    Args:
        console: a ``rich.console.Console`` (default: a new one on stdout).
        max_rows: show at most this many layer rows (first and last halves, the middle
            collapsed into one line); the totals are always shown.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"{rep.model} @ {'x'.join(str(v) for v in rep.input_size)}"
    if rep.batch != 1:
        title += f", batch {rep.batch}"
    table = Table(title=title, show_lines=False, header_style="bold", pad_edge=False)
    graphs = any(r.degree is not None for r in rep.layers)  # D, G, graph, gap only when there are some
    cols = [("layer", {"overflow": "fold"}), ("kind", {}), ("C_in->C_out", {"justify": "right"}), ("kernel", {})]
    if graphs:
        cols += [("D", {"justify": "right"}), ("G", {"justify": "right"}), ("graph", {}),
                 ("gap", {"justify": "right"})]
    cols += [("params", {"justify": "right"}), ("MACs", {"justify": "right"}), ("reason", {})]
    for col, kw in cols:
        table.add_column(col, **kw)
    rows = rep.layers
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        head = (max_rows + 1) // 2
        tail = max_rows - head
        hidden = len(rows) - head - tail
        rows = rows[:head] + [None] + (rows[-tail:] if tail else [])  # type: ignore[list-item]
    for r in rows:
        if r is None:
            table.add_row(f"... {hidden} more layers", *[""] * (len(cols) - 1), style="dim")
            continue
        chans = f"{r.in_channels}->{r.out_channels}" if r.in_channels is not None else ""
        cells = [_fmt_name(r.name), r.kind, chans, "x".join(map(str, r.kernel)) if r.kernel else ""]
        if graphs:
            cells += [_opt(r.degree), _opt(r.blocks), r.graph or "",
                      "" if r.spectral_gap is None else f"{r.spectral_gap:.3f}"]
        reason = r.reason or r.note or ("not run" if r.calls == 0 and not r.projected else "")
        if r.projected:
            reason = f"{reason} (planned)".strip()
        cells += [_before_after(r.params_before, r.params_after), _before_after(r.macs_before, r.macs_after),
                  reason]
        table.add_row(*cells, style="green" if r.converted else None)
    console.print(table)

    t = rep.totals
    foot = Table(title="totals", header_style="bold")
    for col in ("", "before", "after", "reduction"):
        foot.add_column(col, justify="right" if col else "left")
    for label, key in (("params", "params"), ("MACs", "macs"), ("FLOPs", "flops")):
        b, a = t[f"{key}_before"], t[f"{key}_after"]
        foot.add_row(label, _human(b), _human(a), f"{_ratio(b, a):.2f}x")
    console.print(foot)
    console.print(f"{t['converted_layers']} of {len(rep.layers)} counted layers converted; "
                  "FLOPs = 2 x MACs")



def _fmt_name(name: str) -> str:
    return name or "(model)"


def _ratio(before: int, after: int) -> float:
    return float(before) / after if after else float("inf") if before else 1.0


def _opt(v: Any) -> str:
    return "" if v is None else str(v)


def _human(n: float) -> str:
    """25561896 -> '25.56 M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


def _before_after(b: int, a: int) -> str:
    return _human(b) if a == b else f"{_human(b)} -> {_human(a)}"
