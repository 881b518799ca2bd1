"""Layer-shape benchmark: X-layers against dense and grouped, one process, one run.

Shapes: the ResNet-50 bottleneck convs (1x1 reduce, 3x3, 1x1 expand) at 56, 28, 14 and 7 px,
MobileNet-V2's 1x1 expand/project convs, a ViT-S MLP (384->1536->384 over 197 tokens), a
512-wide MLP layer over 128 rows and BERT-base's linears over 128 and 1024 tokens.
Variants: dense, grouped (graph="grouped"), X with mixing 1, 2, 4, X exact, masked-dense
(X k=2 with execution="masked"); backends: torch eager inference, torch forward+backward,
ONNX Runtime. Ratios are to the dense layer of the same shape; the MACs ratio is the limit.

``--sweep`` also times gather against masked execution for every block count the shapes
give (compressions 2/4/8, mixing 1/2/4/8 and exact) and prints which rule for
``execution="auto"`` the numbers support.

    python tools/bench_layers.py --threads 2 --json docs/bench/layers.json --sweep
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xsurgery.bench import (  # noqa: E402
    BACKENDS,
    VARIANT_OPTIONS,
    count_macs,
    machine_info,
    measure,
    ort_runner,
    torch_runner,
    train_runner,
    versions,
    write_json,
)
from xsurgery.layers import XConv2d, XLinear  # noqa: E402

LAYER_VARIANTS = ("dense", "grouped", "x-k1", "x-k2", "x-k4", "x-exact", "masked")

# (family, name, kind, C_in, C_out, kernel, spatial size or tokens)
SHAPES = [
    *[
        row
        for px, c in ((56, 64), (28, 128), (14, 256), (7, 512))
        for row in (
            ("resnet50", f"reduce {4 * c}->{c} @{px}", "conv", 4 * c, c, 1, px),
            ("resnet50", f"3x3 {c}->{c} @{px}", "conv", c, c, 3, px),
            ("resnet50", f"expand {c}->{4 * c} @{px}", "conv", c, 4 * c, 1, px),
        )
    ],
    ("mobilenet_v2", "expand 24->144 @56", "conv", 24, 144, 1, 56),
    ("mobilenet_v2", "project 144->24 @56", "conv", 144, 24, 1, 56),
    ("mobilenet_v2", "expand 32->192 @28", "conv", 32, 192, 1, 28),
    ("mobilenet_v2", "project 192->32 @28", "conv", 192, 32, 1, 28),
    ("mobilenet_v2", "expand 64->384 @14", "conv", 64, 384, 1, 14),
    ("mobilenet_v2", "project 384->64 @14", "conv", 384, 64, 1, 14),
    ("mobilenet_v2", "expand 96->576 @14", "conv", 96, 576, 1, 14),
    ("mobilenet_v2", "project 576->96 @14", "conv", 576, 96, 1, 14),
    ("mobilenet_v2", "expand 160->960 @7", "conv", 160, 960, 1, 7),
    ("mobilenet_v2", "project 960->160 @7", "conv", 960, 160, 1, 7),
    ("mobilenet_v2", "last 320->1280 @7", "conv", 320, 1280, 1, 7),
    ("vit_small", "fc1 384->1536 x197", "linear", 384, 1536, 0, 197),
    ("vit_small", "fc2 1536->384 x197", "linear", 1536, 384, 0, 197),
    # issue 22's training steps: the MLP (batch 128) and BERT-base (batch 1 and 8 x seq 128)
    ("mlp", "fc 512->512 x128", "linear", 512, 512, 0, 128),
    *[
        ("bert", f"{name} x{rows}", "linear", cin, cout, 0, rows)
        for rows in (128, 1024)
        for name, cin, cout in (("qkv 768->768", 768, 768), ("fc1 768->3072", 768, 3072), ("fc2 3072->768", 3072, 768))
    ],
]

TINY_SHAPES = [
    ("tiny", "3x3 16->16 @8", "conv", 16, 16, 3, 8),
    ("tiny", "linear 32->64 x5", "linear", 32, 64, 0, 5),
]


def make_layer(kind: str, cin: int, cout: int, kernel: int, variant: str, compress: float,
               options: dict | None = None) -> nn.Module:
    """The module of one variant (dense: nn.Conv2d / nn.Linear without bias, as in the models)."""
    if variant == "dense":
        return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False) if kind == "conv" else nn.Linear(cin, cout)
    opts = dict(VARIANT_OPTIONS[variant]) if options is None else options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "conv":
            return XConv2d(cin, cout, kernel, padding=kernel // 2, bias=False, compress=compress, **opts)
        return XLinear(cin, cout, compress=compress, **opts)


def make_input(kind: str, cin: int, size: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        return torch.randn(batch, cin, size, size, generator=g)
    return torch.randn(batch, size, cin, generator=g)


def export_layer(m: nn.Module, x: torch.Tensor, path: str, threads: int) -> torch.Tensor:
    """Export one layer with ``export_onnx`` (dynamic batch, as by default): X-layers in the
    ``gather`` layout, masked ones (``execution="masked"``) in the ``dense`` layout.

    Returns the input to feed: a linear layer's ``[N, L, C]`` is exported as ``[N, 1, L, C]``
    (export takes a ``(C, H, W)`` input size); a linear layer does the same work on either.
    """
    from xsurgery.export import export_onnx

    layout = "dense" if getattr(m, "execution", "auto") == "masked" else "gather"
    if x.dim() == 3:
        x = x.unsqueeze(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(nn.Sequential(m), path, input_size=tuple(x.shape[1:]), layout=layout, verify=False,
                    verbose=False, threads=threads)
    return x


def _runners(mods: dict, x: torch.Tensor, backends, tmp: str, threads: int) -> dict:
    runners = {}
    tmp = tempfile.mkdtemp(dir=tmp)  # one folder per shape: file names repeat across shapes
    for key, m in mods.items():
        if "torch" in backends:
            runners[(*key, "torch")] = torch_runner(m, x)
        if "torch-train" in backends:
            import copy

            runners[(*key, "torch-train")] = train_runner(copy.deepcopy(m), x.clone().requires_grad_(True))
        if "ort" in backends:
            path = os.path.join(tmp, "-".join(str(k) for k in key).replace("/", "_") + ".onnx")
            runners[(*key, "ort")] = ort_runner(path, export_layer(m, x, path, threads), threads)
    return runners


def _by_backend(runners: dict, args) -> dict:
    """Backend by backend so two runtimes' thread pools never alternate; variants interleaved."""
    out = {}
    for b in BACKENDS:
        group = {k: f for k, f in runners.items() if k[-1] == b}
        if group:
            out.update(measure(group, warmup=args.warmup, repeat=args.repeat, min_sample_ms=args.min_sample_ms))
    return out


def bench_shapes(shapes, args, threads: int, tmp: str, log) -> list[dict]:
    rows = []
    for family, name, kind, cin, cout, kernel, size in shapes:
        x = make_input(kind, cin, size, args.batch)
        mods, macs = {}, {}
        for c in args.compress:
            for v in args.variants:
                if v == "dense" and ("dense", 1.0) in mods:
                    continue
                key = (v, 1.0 if v == "dense" else float(c))
                mods[key] = make_layer(kind, cin, cout, kernel, v, c).eval()
                macs[key] = count_macs(mods[key], x)
        timings = _by_backend(_runners(mods, x, args.backends, tmp, threads), args)
        for (v, c, b), t in timings.items():
            ref = timings[("dense", 1.0, b)]
            m = mods[(v, c)]
            rows.append({
                "family": family, "shape": name, "kind": kind, "in": cin, "out": cout, "kernel": kernel,
                "size": size, "variant": v, "compress": c, "backend": b,
                "blocks": getattr(m, "blocks", 1), "degree": getattr(m, "degree", cin),
                "execution": _execution(m, b),
                "median_ms": round(t.median_ms, 5), "spread_ms": round(t.spread_ms, 5),
                "min_ms": round(t.min_ms, 5), "max_ms": round(t.max_ms, 5),
                "ratio_to_dense": round(t.median_ms / ref.median_ms, 4),
                "macs_ratio": round(macs[(v, c)] / macs[("dense", 1.0)], 4),
            })
        log(f"  {name}: done")
    return rows


def _execution(m: nn.Module, backend: str) -> str:
    if not isinstance(m, (XConv2d, XLinear)):
        return "dense"
    if backend == "ort":
        return "dense" if m.execution == "masked" else "gather"  # the ONNX layout exported
    return m.resolved_execution(torch.device("cpu"))


def sweep_executions(shapes, args, threads: int, tmp: str, log) -> list[dict]:
    """Gather vs masked for every distinct block count of each shape."""
    rows = []
    for family, name, kind, cin, cout, kernel, size in shapes:
        x = make_input(kind, cin, size, args.batch)
        mods = {("dense", 0, 0): make_layer(kind, cin, cout, kernel, "dense", 1).eval()}
        for c in args.sweep_compress:
            seen = set()
            for graph, mix in [("exact", 1) if k == "exact" else ("random", int(k)) for k in args.sweep_mixing]:
                probe = make_layer(kind, cin, cout, kernel, "x-k2", c, {"graph": graph, "mixing": mix})
                if probe.blocks in seen or probe.blocks == 1:
                    continue
                seen.add(probe.blocks)
                for ex in ("gather", "masked"):
                    mods[(ex, float(c), probe.blocks)] = make_layer(
                        kind, cin, cout, kernel, "x-k2", c, {"graph": graph, "mixing": mix, "execution": ex}).eval()
        timings = _by_backend(_runners(mods, x, args.sweep_backends, tmp, threads), args)
        for (ex, c, g, b), t in timings.items():
            if ex == "dense":
                continue
            m = mods[(ex, c, g)]
            rows.append({
                "family": family, "shape": name, "kind": kind, "in": cin, "out": cout, "kernel": kernel,
                "size": size, "compress": c, "blocks": g, "degree": m.degree, "out_per_block": cout // g,
                "execution": ex, "backend": b, "median_ms": round(t.median_ms, 5),
                "spread_ms": round(t.spread_ms, 5),
                "ratio_to_dense": round(t.median_ms / timings[("dense", 0, 0, b)].median_ms, 4),
            })
        log(f"  sweep {name}: done")
    return rows


def best_rule(sweep: list[dict], backend: str, feature: str, gather_when: str) -> dict:
    """The threshold on ``feature`` (gather when <= or >= it) that loses the least time.

    Loss = sum over layers of (chosen time - best time) / dense-relative, i.e. in ratio units.
    """
    pairs: dict[tuple, dict] = {}
    for r in sweep:
        if r["backend"] == backend:
            pairs.setdefault((r["shape"], r["compress"], r["blocks"]), {})[r["execution"]] = r
    items = [(p["gather"][feature], p["gather"]["ratio_to_dense"], p["masked"]["ratio_to_dense"])
             for p in pairs.values() if "gather" in p and "masked" in p]
    if not items:
        return {}
    best = None
    values = sorted({f for f, _, _ in items})
    never = values[0] - 1 if gather_when == "<=" else values[-1] + 1  # the threshold that never gathers
    for thr in [never, *values]:
        loss, wrong = 0.0, 0
        for f, g, m in items:
            use_gather = f <= thr if gather_when == "<=" else f >= thr
            chosen = g if use_gather else m
            loss += chosen - min(g, m)
            wrong += chosen != min(g, m)
        if best is None or loss < best["loss"]:
            rule = "never" if thr == never else f"{feature} {gather_when} {thr}"
            best = {"feature": feature, "gather_when": rule, "threshold": thr,
                    "loss": round(loss, 4), "wrong": wrong, "cases": len(items)}
    return best


def current_rule_loss(sweep: list[dict], backend: str, max_blocks: int = 64) -> dict:
    """Loss of layers.py's rule: gather when 1 < blocks <= max_blocks and blocks < C_out."""
    pairs: dict[tuple, dict] = {}
    for r in sweep:
        if r["backend"] == backend:
            pairs.setdefault((r["shape"], r["compress"], r["blocks"]), {})[r["execution"]] = r
    loss, wrong, n = 0.0, 0, 0
    for p in pairs.values():
        if "gather" not in p or "masked" not in p:
            continue
        g, m = p["gather"]["ratio_to_dense"], p["masked"]["ratio_to_dense"]
        r = p["gather"]
        chosen = g if (r["blocks"] <= max_blocks and r["blocks"] < r["out"]) else m
        loss += chosen - min(g, m)
        wrong += chosen != min(g, m)
        n += 1
    return {"gather_when": f"blocks <= {max_blocks}", "loss": round(loss, 4), "wrong": wrong, "cases": n}


def print_tables(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    m = data["machine"]
    con.print(f"[bold]{m['cpu']}[/], {m['cores']} cores, {data['threads']} threads, batch {data['batch']}, "
              f"load {m.get('loadavg')}; " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    for b in data["backends"]:
        for c in data["compress"]:
            t = Table(title=f"{b}, C={c:g}: latency / dense (median ms of dense; IQR in % of median)")
            t.add_column("shape")
            t.add_column("dense ms", justify="right")
            for v in data["variants"][1:]:
                t.add_column(v, justify="right")
            t.add_column("MACs", justify="right")
            for shape in dict.fromkeys(r["shape"] for r in data["results"]):
                rs = {r["variant"]: r for r in data["results"] if r["shape"] == shape and r["backend"] == b
                      and r["compress"] in (1.0, float(c))}
                d = rs["dense"]
                cells = [f"{d['median_ms']:.3f} ±{100 * d['spread_ms'] / d['median_ms']:.0f}%"]
                for v in data["variants"][1:]:
                    cells.append(f"{rs[v]['ratio_to_dense']:.2f}" if v in rs else "-")
                macs = next((r["macs_ratio"] for v, r in rs.items() if v != "dense"), 1.0)
                t.add_row(shape, *cells, f"{macs:.2f}")
            con.print(t)
    for r in data.get("rules", []):
        parts = [f"{k.replace('_', ' ')}: gather when {v['gather_when']} -> wrong on {v['wrong']}/"
                 f"{v['cases']}, lost {v['loss']:.2f} x dense in total" for k, v in r.items() if k != "backend"]
        con.print(f"[bold]auto rule, {r['backend']}[/]: " + "; ".join(parts))


def _buckets(values: list[int]) -> list[tuple[int, int]]:
    edges = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1 << 30]
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:]) if any(lo <= v < hi for v in values)]


def sweep_summary(sweep: list[dict], backend: str, feature: str) -> list[dict]:
    """Per power-of-two bucket of ``feature``: cases, how often gather wins, median gather/masked."""
    import statistics

    pairs: dict[tuple, dict] = {}
    for r in sweep:
        if r["backend"] == backend:
            pairs.setdefault((r["shape"], r["compress"], r["blocks"]), {})[r["execution"]] = r
    items = [(p["gather"][feature], p["gather"]["median_ms"] / p["masked"]["median_ms"])
             for p in pairs.values() if "gather" in p and "masked" in p]
    out = []
    for lo, hi in _buckets([f for f, _ in items]):
        ratios = [q for f, q in items if lo <= f <= hi]
        out.append({"range": str(lo) if lo == hi else f"{lo}-{hi}" if hi < 1 << 29 else f">={lo}", "cases": len(ratios),
                    "gather_wins": sum(q < 1 for q in ratios),
                    "median_gather_over_masked": round(statistics.median(ratios), 3)})
    return out


def markdown(data: dict) -> str:
    """The layer tables and the sweep summary as Markdown (for docs/performance.md)."""
    lines = []
    variants = data["variants"][1:]
    for b in data["backends"]:
        for c in data["compress"]:
            lines += [f"\n**{b}, C={c:g}** (latency / dense; dense median in ms)\n",
                      "| shape | dense ms | " + " | ".join(variants) + " | MACs |",
                      "|---|---|" + "---|" * (len(variants) + 1)]
            for shape in dict.fromkeys(r["shape"] for r in data["results"]):
                rs = {r["variant"]: r for r in data["results"] if r["shape"] == shape and r["backend"] == b
                      and r["compress"] in (1.0, float(c))}
                cells = [f"{rs[v]['ratio_to_dense']:.2f}" if v in rs else "-" for v in variants]
                macs = next((r["macs_ratio"] for v, r in rs.items() if v != "dense"), 1.0)
                lines.append(f"| {shape} | {rs['dense']['median_ms']:.3f} | " + " | ".join(cells) + f" | {macs:.2f} |")
    if data.get("sweep"):
        for feature in ("out_per_block", "blocks"):
            backends = [r["backend"] for r in data["rules"]]
            lines += [f"\n**gather vs masked by {feature}** (cases where gather wins / cases; median gather/masked)\n",
                      f"| {feature} | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
            per = {b: {row["range"]: row for row in sweep_summary(data["sweep"], b, feature)} for b in backends}
            for rng in dict.fromkeys(k for b in backends for k in per[b]):
                cells = [f"{per[b][rng]['gather_wins']}/{per[b][rng]['cases']}; "
                         f"{per[b][rng]['median_gather_over_masked']:.2f}" if rng in per[b] else "-" for b in backends]
                lines.append(f"| {rng} | " + " | ".join(cells) + " |")
        lines += ["\n| backend | rule | wrong | lost (sum of x dense) |", "|---|---|---|---|"]
        for r in data["rules"]:
            for k, v in r.items():
                if k != "backend":
                    lines.append(f"| {r['backend']} | {k.replace('_', ' ')}: gather when {v['gather_when']} | "
                                 f"{v['wrong']}/{v['cases']} | {v['loss']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compress", type=float, nargs="+", default=[4.0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--variants", nargs="+", default=list(LAYER_VARIANTS), choices=LAYER_VARIANTS)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-sample-ms", type=float, default=10.0)
    p.add_argument("--family", nargs="+", default=None, help="resnet50, mobilenet_v2, vit_small, mlp, bert")
    p.add_argument("--tiny", action="store_true", help="two tiny shapes (smoke test)")
    p.add_argument("--sweep", action="store_true", help="also time gather vs masked across block counts")
    p.add_argument("--sweep-compress", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--sweep-mixing", nargs="+", default=["1", "2", "4", "8", "exact"], choices=["1", "2", "4", "8", "exact"],
                   help="the mixings (and exact) whose block counts the sweep times")
    p.add_argument("--sweep-backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.json_out and os.path.exists(args.json_out) and not args.force:
        p.error(f"{args.json_out} exists; pass --force to overwrite it")
    if "dense" not in args.variants:
        args.variants = ["dense", *args.variants]
    shapes = TINY_SHAPES if args.tiny else [s for s in SHAPES if args.family is None or s[0] in args.family]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    data = {"threads": threads, "batch": args.batch, "compress": args.compress, "variants": args.variants,
            "backends": args.backends, "repeat": args.repeat, "warmup": args.warmup,
            "versions": versions(), "machine": machine_info(),
            "command": "python tools/bench_layers.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory(prefix="xsurgery-layers-") as tmp:
        data["results"] = bench_shapes(shapes, args, threads, tmp, log)
        if args.sweep:
            data["sweep"] = sweep_executions(shapes, args, threads, tmp, log)
            rules = []
            for b in args.sweep_backends:
                rules.append({"backend": b, "current": current_rule_loss(data["sweep"], b),
                              "best_blocks": best_rule(data["sweep"], b, "blocks", "<="),
                              "best_out_per_block": best_rule(data["sweep"], b, "out_per_block", ">=")})
            data["rules"] = rules
    data["machine_after"] = machine_info()
    print_tables(data)
    if args.markdown:
        print(markdown(data))
    if args.json_out:
        write_json(data, args.json_out, indent=None)  # the sweep makes it long: one line
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
