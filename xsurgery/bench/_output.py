"""Rendering a :func:`bench` result: rich table, Markdown, plot, JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._run import ALL_BACKENDS, ALL_VARIANTS


def print_table(result: dict[str, Any], console=None) -> None:
    """A rich table of one :func:`bench` result."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result["machine"]
    table = Table(title=(f"{result['model']}{'  ' + result['quantize'] if result.get('quantize') else ''}  batch {result['batch']}  input {result['input_size']}  "
                         f"{result['threads']} threads  {m['cpu']}"))
    for col in ("variant", "C", "backend", "median ms", "IQR ms", "x dense", "MACs x", "x limit"):
        table.add_column(col, justify="left" if col in ("variant", "backend") else "right")
    order = {b: i for i, b in enumerate(ALL_BACKENDS)}
    vorder = {v: i for i, v in enumerate(ALL_VARIANTS)}
    rows = sorted(result["results"], key=lambda r: (order[r["backend"]], r["compress"] if r["variant"] != "dense"
                                                    else 0, vorder[r["variant"]]))
    last = None
    for r in rows:
        if last is not None and r["backend"] != last:
            table.add_section()
        last = r["backend"]
        table.add_row(
            r["variant"], f"{r['compress']:g}", r["backend"], f"{r['median_ms']:.3f}", f"{r['spread_ms']:.3f}",
            f"{r['ratio_to_dense']:.2f}", f"{r['macs_ratio']:.2f}", f"{r['ratio_to_dense'] / r['macs_ratio']:.2f}",
        )
    console.print(table)
    v = result["versions"]
    console.print(f"torch {v['torch']}, onnxruntime {v['onnxruntime']}; x dense = median / dense median; "
                  "x limit = (x dense) / (MACs x), 1.0 = as fast as the MACs allow")


def csv_table(result: dict[str, Any]) -> str:
    """One CSV row per variant, compression and backend (raw numbers)."""
    import csv
    import io

    keys = ("variant", "compress", "backend", "median_ms", "spread_ms", "ratio_to_dense", "macs_ratio")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in result["results"]:
        w.writerow([r.get(k, "") for k in keys])
    return buf.getvalue()


def markdown_table(result: dict[str, Any], backends: Sequence[str] = ALL_BACKENDS) -> str:
    """A Markdown table: one row per variant and compression, per backend the ratio to dense
    (with the dense median in ms in the dense row), and the MACs ratio."""
    rows = result["results"]
    present = [b for b in backends if any(r["backend"] == b for r in rows)]
    by = {(r["variant"], r["compress"], r["backend"]): r for r in rows}
    keys = sorted({(r["variant"], r["compress"]) for r in rows},
                  key=lambda k: (k[1] if k[0] != "dense" else 0, ALL_VARIANTS.index(k[0])))
    lines = ["| variant | C | " + " | ".join(present) + " | MACs |", "|---|---|" + "---|" * (len(present) + 1)]
    for v, c in keys:
        cells = []
        for b in present:
            r = by.get((v, c, b))
            if r is None:
                cells.append("-")
            elif v == "dense":
                cells.append(f"{r['median_ms']:.1f} ms (IQR {r['spread_ms']:.1f})")
            else:
                cells.append(f"{r['ratio_to_dense']:.2f}")
        macs = next(r["macs_ratio"] for (vv, cc, _), r in by.items() if (vv, cc) == (v, c))
        lines.append(f"| {v} | {c:g} | " + " | ".join(cells) + f" | {macs:.2f} |")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]] | dict[str, Any], path: str | os.PathLike) -> None:
    """Latency ratio to dense against compression, one panel per backend, MACs ratio as the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = results if isinstance(results, dict) else results[0]
    rows = result["results"]
    backends = [b for b in ALL_BACKENDS if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, b in zip(axes[0], backends):
        mine = [r for r in rows if r["backend"] == b and r["variant"] != "dense"]
        for v in ALL_VARIANTS[1:]:
            pts = sorted((r["compress"], r["ratio_to_dense"]) for r in mine if r["variant"] == v)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        limit = sorted({(r["compress"], r["macs_ratio"]) for r in mine})
        if limit:
            ax.plot(*zip(*limit), "k--", marker="x", label="MACs ratio (limit)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{result['model']} - {b}")
        ax.set_xlabel("compression C")
        ax.set_ylabel("latency / dense")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["compress"] for r in mine})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"batch {result['batch']}, {result['threads']} threads, {result['machine']['cpu']}", fontsize="small")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None], force: bool = True) -> None:
    from .._util.io import write_atomic

    write_atomic(os.fspath(path), write, force=force)


def write_json(data: Any, path: str | os.PathLike, indent: int | None = 1, force: bool = True) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, separators=None if indent else (",", ":"))
            f.write("\n")

    _atomic_write(path, write, force)
