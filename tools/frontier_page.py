"""The frontier evidence page and the README's "Which variant should I ship?" table, from sweeps.

    .venv/bin/python tools/frontier_page.py --sweep mlp=/path/to/sweep/mlp --sweep mobilenet=... --sweep resnet=...

Copies each sweep's page, summary, per-run JSON and plots to ``docs/results/frontier/<net>/``,
then writes between the markers of ``docs/results/frontier.md`` (results) and ``README.md``
(the table) what the rule on that page says: per net the variants on the latency front, and
per candidate configuration its gap to the front (the front's top-1 at the candidate's
latency, on the straight line between front points, minus its own top-1), averaged over the
nets at C = 4. Nets whose sweep has no latency yet are listed as such, never guessed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xsurgery.bench import pareto_front  # noqa: E402  (the sweep's own front marking)

PAGE, README = os.path.join(ROOT, "docs", "results", "frontier.md"), os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- frontier:begin (tools/frontier_page.py) -->", "<!-- frontier:end -->"
CANDIDATES = ("x@4", "x@4:mixing=1", "x@4:mix_points=chain", "x@4:graph=paired")
LEGEND = ("`x@4` is mixing 2 with the `random` graph (the recipes set mixing 2; the default until this page); "
          "`x@4:mixing=1` is mixing 1 with chain mix points (`auto` at mixing 1).")


def front_top1(front: list[tuple[float, float]], cost: float) -> float:
    """The front's top-1 at ``cost``: linear between front points, the cheapest point's below them,
    the best point's above them."""
    pts = sorted(front)
    if cost <= pts[0][0]:
        return pts[0][1]
    for (c0, t0), (c1, t1) in zip(pts, pts[1:]):
        if c0 <= cost <= c1:
            return t0 + (t1 - t0) * (cost - c0) / (c1 - c0) if c1 > c0 else max(t0, t1)
    return pts[-1][1]


def gaps(rows: list[dict]) -> dict[str, float]:
    """Each variant's top-1 gap to the latency front (0 on it); empty without latencies."""
    have = [r for r in rows if r.get("latency") is not None and not math.isnan(r["latency"])]
    front = [(r["latency"], r["top1"]) for r in have if r.get("front_latency")]
    return {r["variant"]: max(0.0, front_top1(front, r["latency"]) - r["top1"]) for r in have} if front else {}


def median_latency(timings: list[list[dict]]) -> list[dict]:
    """The rows of the last timing run with each variant's latency the median over all runs, and
    the latency front marked anew on those medians (as the sweep marks it)."""
    rows = [dict(r) for r in timings[-1]]
    for r in rows:
        vals = [v for v in (next((x.get("latency") for x in run if x["variant"] == r["variant"]), None)
                            for run in timings) if v is not None and not math.isnan(v)]
        r["latency"] = statistics.median(vals) if vals else None
    marks = pareto_front([(math.nan if r["latency"] is None or r.get("accuracy_only") else r["latency"], r["top1"])
                          for r in rows])
    for r, on in zip(rows, marks):
        r["front_latency"] = on
    return rows


def pick(per_net: dict[str, dict[str, float]], nets: dict[str, list[dict]]) -> str | None:
    """The rule's choice: the candidate with the smallest mean gap over the nets that measured it
    all; a tie within 0.1 points goes to the lower mean latency ratio. ``None`` until every net
    has every candidate's gap."""
    scored = []
    for cand in CANDIDATES:
        vals = [per_net[n].get(cand) for n in nets]
        if not vals or any(v is None for v in vals):
            return None
        lat = [next(r["latency"] for r in rows if r["variant"] == cand) for rows in nets.values()]
        scored.append((sum(vals) / len(vals), sum(lat) / len(lat), cand))
    best = min(g for g, _, _ in scored)
    return min((s for s in scored if s[0] <= best + 0.1), key=lambda s: s[1])[2]


def _replace(path: str, block: str) -> None:
    text = open(path, encoding="utf-8").read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + block + END + "\n"
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="append", default=[], metavar="NET=FOLDER", help="a finished sweep folder")
    ap.add_argument("--timing", action="append", default=[], metavar="FOLDER",
                    help="an earlier timing run of the same sweeps: <net>.json copies of their summary.json; "
                         "the rule then reads each variant's median latency over these and the sweeps' own")
    args = ap.parse_args(argv)
    nets: dict[str, list[dict]] = {}
    runs: list[dict[str, list[dict]]] = []
    for item in args.sweep:
        net, _, folder = item.partition("=")
        summary = json.load(open(os.path.join(folder, "summary.json"), encoding="utf-8"))
        nets[net] = summary["variants"]
        dest = os.path.join(ROOT, "docs", "results", "frontier", net)
        os.makedirs(os.path.join(dest, "results"), exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith((".md", ".json", ".png")):
                shutil.copy2(os.path.join(folder, name), os.path.join(dest, name))
        for name in os.listdir(os.path.join(folder, "results")):
            shutil.copy2(os.path.join(folder, "results", name), os.path.join(dest, "results", name))
    for i, folder in enumerate(args.timing, 1):
        runs.append({net: json.load(open(os.path.join(folder, f"{net}.json"), encoding="utf-8"))["variants"]
                     for net in nets})
        for net in nets:  # kept next to the page: the rule's inputs
            shutil.copy2(os.path.join(folder, f"{net}.json"),
                         os.path.join(ROOT, "docs", "results", "frontier", net, f"timing-{i}.json"))
    runs.append(nets)
    if len(runs) > 1:
        nets = {net: median_latency([run[net] for run in runs]) for net in nets}
    lines = []
    for net, rows in nets.items():
        on = [r for r in rows if r.get("front_latency") and r.get("latency") is not None]
        lat = "measured" if on else "**not measured yet**"
        lines.append(f"- **{net}** ({len(rows)} variants, latency {lat}): best top-1 "
                     + ", ".join(f"{r['variant']} {r['top1']:.2f}" for r in sorted(rows, key=lambda r: -r["top1"])[:3])
                     + (f"; on the latency front: {', '.join(r['variant'] for r in on)}" if on else ""))
    per_net = {net: gaps(rows) for net, rows in nets.items()}
    front = ["| net | on the latency front | top-1 % (mean ± std) | seeds | latency / dense |", "|---|---|---|---|---|"]
    for net, rows in nets.items():
        for r in sorted((r for r in rows if r.get("front_latency") and r.get("latency") is not None),
                        key=lambda r: r["latency"]):
            front.append(f"| {net} | {r['variant']} | {r['top1']:.2f} ± {r['top1_std']:.2f} | {len(r['seeds'])} "
                         f"| {r['latency']:.2f} |")
    table = ["| configuration | " + " | ".join(f"gap, {n}" for n in nets) + " | mean gap |", "|---|" + "---|" * (len(nets) + 1)]
    for cand in CANDIDATES:
        vals = [per_net[n].get(cand) for n in nets]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        table.append(f"| {cand} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in vals)
                     + f" | {'n/a' if all(v is None for v in vals) else f'{mean:.2f}'} |")
    chosen = pick(per_net, nets)
    verdict = [f"By the rule (smallest mean gap at C = 4, ties within 0.1 to the lower mean latency): **{chosen}**"
               + (f" (latency: the median of {len(runs)} timing runs; each run alone picks "
                  + ", ".join(str(pick({n: gaps(r) for n, r in run.items()}, run)) for run in runs) + ")"
                  if len(runs) > 1 else "") + ".", ""] if chosen else []
    block = "\n".join(["## Results (generated)", "", *lines, "",
                       "The latency fronts (ONNX Runtime, batch 1, 2 threads"
                       + (f"; latency: the median of {len(runs)} timing runs" if len(runs) > 1 else "") + "):", "", *front, "",
                       "Gap to the latency front at C = 4 (top-1 points; 0: on the front; n/a: not measured):", "",
                       *table, "", LEGEND, "", *verdict]) + "\n"
    _replace(PAGE, block)
    _replace(README, "\n".join(["See [docs/results/frontier.md](docs/results/frontier.md) for the method and the rule.",
                                "", *front, "", "Gap of each candidate default to the latency front at C = 4 "
                                "(top-1 points; 0: on the front):", "", *table, "", LEGEND, "", *verdict]) + "\n")
    print(f"wrote {PAGE} and the README table", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
