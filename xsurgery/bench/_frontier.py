"""The accuracy-cost frontier of a sweep: Pareto marking, the summary, the page and its plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["COSTS", "pareto_front", "still_rising", "summarize", "sweep_page", "sweep_plots"]

RISING_POINTS = 0.3  # top-1 points the last two epochs gain over every earlier one: "still rising"

# cost axes of the page: (summary key, label); lower is better on each, higher top-1 is better
COSTS = (("latency", "latency / dense"), ("macs", "MACs"), ("params", "parameters"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, score) points: ``True`` where no other point is at most as costly and at least
    as good, and strictly better in one (lower cost wins, higher score wins). NaN is never on it."""
    out = []
    for i, (c, s) in enumerate(points):
        if math.isnan(c) or math.isnan(s):
            out.append(False)
            continue
        dominated = any(j != i and c2 <= c and s2 >= s and (c2 < c or s2 > s)
                        for j, (c2, s2) in enumerate(points) if not (math.isnan(c2) or math.isnan(s2)))
        out.append(not dominated)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], latency: dict[str, float] | None) -> list[dict[str, Any]]:
    """One row per variant (in the order first seen): top-1 mean/std over its seeds, params, MACs,
    the measured latency ratio to dense, and its place on the front of each cost."""
    order: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        order.setdefault(r["variant"], []).append(r)
    rows = []
    for name, rs in order.items():
        top1, std = _mean_std([100 * r["test_top1"] for r in rs])
        curve = rs[0].get("curve") or []
        rows.append({"variant": name, "seeds": sorted(r["seed"] for r in rs), "top1": top1, "top1_std": std,
                     "params": rs[0]["params"], "macs": rs[0]["macs"],
                     "latency": (latency or {}).get(name, math.nan), "curve": curve,
                     "still_rising": still_rising(curve), "accuracy_only": bool(rs[0].get("accuracy_only"))})
    for key, _ in COSTS:  # an accuracy-only row (unstructured sparsity) is never on a front
        marks = pareto_front([(math.nan if r["accuracy_only"] else float(r[key]), r["top1"]) for r in rows])
        for r, on in zip(rows, marks):
            r[f"front_{key}"] = on
    return rows


def still_rising(curve: Sequence[float]) -> bool:
    """Validation top-1 still climbing at the end: the best of the last two epochs beats every
    earlier epoch by more than :data:`RISING_POINTS` points (a cosine schedule's last epochs
    always gain a little as the rate anneals; a curve that has levelled off gains no more)."""
    if len(curve) < 3:
        return len(curve) == 2 and 100 * (curve[-1] - curve[0]) > RISING_POINTS
    return 100 * (max(curve[-2:]) - max(curve[:-2])) > RISING_POINTS


def _ratio(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def _num(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:g}"


def sweep_page(title: str, rows: list[dict[str, Any]], meta: dict[str, Any], plots: Sequence[str]) -> str:
    """The markdown page: how it was measured, the table (fronts starred) and the plots."""
    extra = [str(b) for b in (meta.get("batches") or [])[1:]]  # latency at further batch sizes
    lines = [f"# {title}", "",
             f"Recipe `{meta['recipe']}`; seeds {', '.join(map(str, meta['seeds']))} (and the finished runs of other "
             f"seeds in the folder: n per row); overrides "
             f"`{' '.join(meta['overrides']) or 'none'}`. Top-1 on the test split (mean ± std over seeds) "
             f"of each run's `best.xs`. Latency: {meta.get('latency_note', 'not measured')}.", "",
             f"| variant | top-1 % | params | MACs | latency / dense{''.join(f' | batch {b}' for b in extra)} "
             f"| front (latency, MACs, params) |",
             "|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
    for r in rows:
        lat = " | ".join(_ratio(v) for v in [r["latency"], *(r.get("latency_by_batch", {}).get(b, math.nan)
                                                              for b in extra)])
        fronts = ", ".join("*" if r[f"front_{k}"] else "-" for k, _ in COSTS)
        n = f" (n={len(r['seeds'])})" if len(r["seeds"]) > 1 else ""
        lines.append(f"| {r['variant']} | {r['top1']:.2f} ± {r['top1_std']:.2f}{n} | {_num(r['params'])} | "
                     f"{_num(r['macs'])} | {lat} | {fronts} |")
    lines += ["", "`*`: on the Pareto front of top-1 against that cost (no variant is at most as costly and "
              "at least as accurate, and better in one)."]
    if any(r.get("accuracy_only") for r in rows):
        lines += ["Unstructured rows are accuracy only: their params are the nonzero weights of a dense model "
                  "trained masked; nothing runs them faster, so they are not timed and on no front."]
    if any(r["variant"].startswith("tp@") for r in rows):
        lines += ["`tp@C` rows start from the trained dense run (its cost comes on top of their fine-tune epochs)."]
    lines += [""]
    rising = [r["variant"] for r in rows if r.get("still_rising")]
    lines += ["Learning curves (`curves.png`, validation top-1 per epoch, first seed): "
              + (f"**still rising at the end** for {', '.join(rising)} (their last two epochs beat every earlier one "
                 f"by more than {RISING_POINTS} points): their top-1 is not final." if rising else
                 "every curve has levelled off (the last two "
                 f"epochs gain at most {RISING_POINTS} points over the best earlier one)."), ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def sweep_plots(rows: list[dict[str, Any]], folder: str, force: bool = True) -> list[str]:
    """Top-1 against each cost, fronts joined by a line; returns the file names written."""
    import os

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [_curves_plot(rows, folder, force)] if any(r.get("curve") for r in rows) else []
    for key, label in COSTS:
        pts = [r for r in rows if not math.isnan(float(r[key]))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in pts:
            ax.errorbar(r[key], r["top1"], yerr=r["top1_std"], fmt="o" if r[f"front_{key}"] else "x",
                        color="C0" if r[f"front_{key}"] else "C7", capsize=2)
            ax.annotate(r["variant"], (r[key], r["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((r[key], r["top1"]) for r in pts if r[f"front_{key}"])
        if front:
            ax.plot(*zip(*front), "-", color="C0", alpha=0.6, label="Pareto front")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(label + (" (log)" if key != "latency" else ""))
        if key != "latency":
            ax.set_xscale("log")
        ax.set_ylabel("test top-1 %")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"top1_vs_{key}.png"
        _save(fig, os.path.join(folder, name), force)
        names.append(name)
    return names


def _save(fig, path: str, force: bool) -> None:
    import io

    import matplotlib.pyplot as plt

    from .._util.io import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue(), force=force)


def _curves_plot(rows: list[dict[str, Any]], folder: str, force: bool) -> str:
    import os

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("curve"):
            ax.plot(range(1, len(r["curve"]) + 1), [100 * v for v in r["curve"]], marker=".", label=r["variant"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, os.path.join(folder, "curves.png"), force)
    return "curves.png"
