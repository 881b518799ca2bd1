"""Pictures (matplotlib, the optional ``plot`` extra, imported only here and only when asked).

* :func:`plot_report`: per layer, in network order, params and MACs before and after and the
  spectral gap of each converted layer (``xsurgery report/convert --plot``);
* :func:`plot_layer_graph`: one layer's biadjacency, blocks of outputs against inputs
  (``xsurgery graph --layer``);
* :func:`plot_reach`: inputs reached per output after 1, 2, ... converted layers against the
  grouped baseline (``xsurgery graph``).

Every picture is written atomically (no overwrite without ``force``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..graphs import BipartiteGraph
    from ._report import Report

__all__ = ["plot_layer_graph", "plot_reach", "plot_report"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'xsurgery[plot]'") from None
    matplotlib.use("Agg", force=True)  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str, force: bool) -> None:
    from .._util.io import write_bytes

    if not str(path).lower().endswith(".png"):
        raise UserError(f"--plot writes PNG: give a file name ending in .png, not {path!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    write_bytes(path, buf.getvalue(), force=force)


def plot_report(rep: Report, path: str, *, force: bool = False) -> None:
    """Per-layer params and MACs (before / after, log scale) and spectral gap, in network order.

    Args:
        rep: a report (with MACs when it had an example input; without, the MACs panel says so).
        path: the ``.png`` to write.
        force: overwrite an existing file.
    """
    plt = _pyplot()
    rows = [r for r in rep.layers if r.kind not in ("matmul", "attention", "functional") or r.macs_before]
    if not rows:
        raise UserError(f"{rep.model} has no conv/linear layer to plot")
    x = list(range(len(rows)))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, min(16.0, 0.12 * len(rows) + 4)), 7.5), sharex=True,
                             gridspec_kw={"height_ratios": [2, 2, 1]})
    panels = (("params", [r.params_before for r in rows], [r.params_after for r in rows]),
              ("MACs", [r.macs_before for r in rows], [r.macs_after for r in rows]))
    for ax, (label, before, after) in zip(axes, panels):
        if label == "MACs" and not rep.macs_known:
            ax.text(0.5, 0.5, "no example input: MACs unknown", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel(label)
            continue
        ax.bar(x, before, width=0.8, color="#c8c8c8", label="before (dense)")
        ax.bar(x, after, width=0.5, color="#2a7ab0", label="after")
        if label == "MACs" and any(r.execution == "masked" for r in rows):
            ex = [r.executed_macs if r.execution else None for r in rows]
            ax.scatter([i for i, v in zip(x, ex) if v], [v for v in ex if v], marker="_", color="#d62728", s=40,
                       label="executed (masked runs dense)", zorder=3)
        if any(v > 0 for v in before):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False)
    gaps = [r.spectral_gap if r.spectral_gap is not None else 0.0 for r in rows]
    axes[2].bar(x, gaps, width=0.8, color=["#2a7ab0" if r.spectral_gap is not None else "#eeeeee" for r in rows])
    axes[2].set_ylabel("spectral gap")
    axes[2].set_ylim(0, max([0.05, *gaps]) * 1.15)
    axes[2].set_xlabel("layer (network order)")
    step = max(1, len(rows) // 40)  # at most ~40 tick labels stay readable
    axes[2].set_xticks(x[::step])
    axes[2].set_xticklabels([r.name or "(model)" for r in rows][::step], rotation=90, fontsize=6)
    t = rep.totals
    title = f"{rep.model}: params {t['params_ratio']:.2f}x smaller"
    if t.get("macs_ratio"):
        title += f", MACs {t['macs_ratio']:.2f}x fewer"
    fig.suptitle(title)
    _save(fig, path, force)


def plot_layer_graph(g: BipartiteGraph, path: str, *, title: str = "", force: bool = False) -> None:
    """The layer's output-by-input connectivity as an image; lines separate the blocks of outputs."""
    plt = _pyplot()
    mask = g.mask().numpy()
    aspect = mask.shape[0] / mask.shape[1]
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, min(9.0, 7.0 * aspect + 1))))
    ax.imshow(mask, cmap="Greys", interpolation="nearest", aspect="auto")
    if g.blocks > 1 and g.blocks <= 256:
        for b in range(1, g.blocks):
            ax.axhline(b * g.block_size - 0.5, color="#d62728", linewidth=1.0)
    ax.set_xlabel(f"input channel (C_in = {g.in_features})")
    ax.set_ylabel(f"output channel (C_out = {g.out_features})")
    ax.set_title(f"{title}  {g.construction}: D={g.degree} of {g.in_features}, G={g.blocks} blocks, "
                 f"each input in {g.mixing:g} blocks".strip())
    _save(fig, path, force)


def plot_reach(rows: Sequence[Any], path: str, *, title: str = "", force: bool = False) -> None:
    """Mean inputs reached per output after 1, 2, ... converted layers, against the grouped baseline."""
    plt = _pyplot()
    if not rows:
        raise UserError("no converted layers to follow")
    depth = [r.depth for r in rows]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(depth, [r.reach_mean / r.inputs for r in rows], marker="o", color="#2a7ab0",
            label="expander (this model)")
    grouped = [(r.depth, r.grouped_mean / r.inputs) for r in rows if r.grouped_mean is not None]
    if grouped:
        ax.plot(*zip(*grouped), marker="s", color="#999999", linestyle="--", label="grouped, same degree")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("converted layers along the main path")
    ax.set_ylabel(f"inputs reached per output (of {rows[0].inputs})")
    ax.set_title(f"{title}: sensitivity depth (Theorem 3.1)")
    ax.legend(loc="lower right", frameon=False)
    ax.grid(alpha=0.3)
    _save(fig, path, force)
