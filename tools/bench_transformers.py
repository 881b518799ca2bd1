"""Transformers in ONNX Runtime / OpenVINO: the default X-model's exported file against dense.

For each Hugging Face model (built from its default config, random weights, no download),
sequence length, batch and compression: ``convert(model, compress=C)`` with no other option
(the default) and ``export_onnx`` with its defaults (``layout="auto"``: per layer the fastest
of XLinear's gather / matmul / dense forms, then the whole-model check that falls back to
all-dense), against the dense model exported the same way. Optional rows: ``gather`` /
``matmul`` (every X-layer in that form, no timing), ``fast`` (``mixing=1``, the default since the frontier), ``k2`` (``mixing=2``), ``grouped``
(``graph="grouped"``: the same blocks with no permutation, the floor of the structure)
and ``tp`` (Torch-Pruning at the X-model's MACs: one ratio for every layer, head dims
pruned, attention sizes updated; where it fails the row says why).

All files of one (model, batch) are timed in one process, interleaved (every file once per
round, backend by backend), 2 intra-op threads (ORT spinning off, as ``export`` times);
ratios are the median of the per-round ratios to dense. MACs ratio: the report's counter
(X-layers compact; attention matmuls, embeddings, LM head as they are).

    python tools/bench_transformers.py                       # BERT b1/b8, GPT-2 b1, C = 2 and 4
    python tools/bench_transformers.py --quick               # BERT and GPT-2 b1 C=4, ORT only, few rounds
    python tools/bench_transformers.py --variants dense default matmul gather fast tp --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("dense", "default", "gather", "matmul", "fast", "k2", "grouped", "tp")
BATCHES = {"bert": [1, 8], "gpt2": [1]}


def _example(model, batch: int, seq: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    kw = {"input_ids": ids}
    if "attention_mask" in inspect.signature(model.forward).parameters:  # GPT-2 exports only with one
        kw["attention_mask"] = torch.ones(batch, seq, dtype=torch.int64)
    return (), kw


def _tp_model(dense, example, target_macs, macs):
    """Torch-Pruning (L2 magnitude) at ``target_macs``: attention head dims pruned together."""
    import torch
    import torch_pruning as tp

    from xsurgery.surgery import MACS_TOL, bisect_to_macs

    ids = example[1]["input_ids"]

    def prune(ratio: float):
        import copy

        out = copy.deepcopy(dense).eval()
        heads, attn = {}, []
        for m in out.modules():
            q = getattr(m, "query", None)
            if q is not None and hasattr(m, "num_attention_heads"):  # BERT's self-attention
                for lin in (m.query, m.key, m.value):
                    heads[lin] = m.num_attention_heads
                attn.append(m)
        head = [m for n, m in out.named_modules() if n in ("pooler.dense", "lm_head")]
        pruner = tp.pruner.MagnitudePruner(
            out, ids, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=head, num_heads=heads, prune_head_dims=True, prune_num_heads=False,
            output_transform=lambda o: (o[0] if isinstance(o, (tuple, list)) else next(iter(o.values()))).sum())
        pruner.step()
        for m in attn:
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
            if hasattr(m, "scaling"):
                m.scaling = m.attention_head_size ** -0.5
        with torch.no_grad():
            out(**example[1])
        return out

    model, ratio = bisect_to_macs(prune, macs, target_macs, 0.0, 0.95, shrink=True, tol=MACS_TOL)
    return model, ratio


def _runner(runtime: str, path: str, example, threads: int):
    from xsurgery.bench import runtime_runner

    return runtime_runner(runtime, path, example, threads)


def _interleaved(runners: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["bert", "gpt2"], help="hf/ short names")
    p.add_argument("--compress", type=float, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: bert 1 8, gpt2 1")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"], choices=["onnxruntime", "openvino"])
    p.add_argument("--variants", nargs="+", default=["dense", "default", "tp"], choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="b1, C=4, ORT only, 5 rounds, no tp")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.compress, args.backends, args.rounds = [1], [4], ["onnxruntime"], 5
        args.variants = [v for v in args.variants if v != "tp"]
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    warnings.filterwarnings("ignore")
    import torch

    from xsurgery.bench import count_macs, machine_info
    from xsurgery.export import export_onnx
    from xsurgery.models import create_model
    from xsurgery.surgery import convert

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"{info.get('cpu')}, {os.cpu_count()} CPUs, threads {args.threads}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            dense = create_model(f"hf/{name}").eval()
            for b in args.batch or BATCHES.get(name, [1]):
                ex = _example(dense, b, args.seq)
                dense_macs = count_macs(dense, ex)
                files: dict[tuple[str, float, str], str] = {}
                meta: dict[tuple[str, float], dict] = {}
                for backend in args.backends:
                    f = os.path.join(tmp, f"{name}-b{b}-dense-{backend}.onnx")
                    export_onnx(dense, f, example_inputs=ex, verify=False, verbose=False, threads=args.threads,
                                runtime=backend, force=True)
                    files[("dense", 1.0, backend)] = f
                meta[("dense", 1.0)] = {"macs_ratio": 1.0}
                for c in args.compress:
                    x_default = convert(dense, compress=c, example_inputs=ex, check=False)[0].eval()
                    x_macs = count_macs(x_default, ex)
                    for v in args.variants:
                        if v == "dense":
                            continue
                        try:
                            if v == "tp":
                                model, ratio = _tp_model(dense, ex, x_macs, lambda m, e=ex: count_macs(m, e))
                                extra = {"pruning_ratio": round(ratio, 4)}
                            elif v in ("default", "gather", "matmul"):
                                model, extra = x_default, {}
                            else:  # fast: mixing 1 (the default since the frontier), k2: mixing 2, grouped
                                opts = {"fast": {"mixing": 1}, "k2": {"mixing": 2}, "grouped": {"graph": "grouped"}}[v]
                                model, extra = convert(dense, compress=c, example_inputs=ex, check=False,
                                                       **opts)[0].eval(), {}
                        except Exception as exc:  # tp on a model Torch-Pruning cannot handle: say why
                            notes.append(f"{name} b{b} C={c:g} {v}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                            print("  skipped:", notes[-1], flush=True)
                            continue
                        meta[(v, c)] = {"macs_ratio": count_macs(model, ex) / dense_macs, **extra}
                        for backend in args.backends:
                            f = os.path.join(tmp, f"{name}-b{b}-{v}-{c:g}-{backend}.onnx")
                            kw = {} if v in ("default", "fast", "k2", "grouped", "tp") else {"layout": v}
                            t0 = time.perf_counter()
                            res = export_onnx(model, f, example_inputs=ex, verify=v == "default", verbose=False,
                                              threads=args.threads, runtime=backend, force=True, **kw)
                            files[(v, c, backend)] = f
                            picked = list(res.layers.values())
                            meta[(v, c)][f"{backend}_layers"] = {k: picked.count(k) for k in dict.fromkeys(picked)}
                            meta[(v, c)][f"{backend}_pick"] = res.auto_pick
                            print(f"  exported {name} b{b} {v} C={c:g} for {backend} in {time.perf_counter() - t0:.0f} s: "
                                  f"{res.auto_pick or v} {meta[(v, c)][f'{backend}_layers']}", flush=True)
                for backend in args.backends:
                    mine = {k: f for k, f in files.items() if k[2] == backend}
                    runners = {k: _runner(backend, f, ex, args.threads) for k, f in mine.items()}
                    s = _interleaved(runners, args.rounds, warmup=3)
                    d = s[("dense", 1.0, backend)]
                    for (v, c, _), t in s.items():
                        row = {"model": name, "batch": b, "seq": args.seq, "backend": backend, "variant": v,
                               "compress": c, "median_ms": 1e3 * statistics.median(t),
                               "ratio": statistics.median(a / bb for a, bb in zip(t, d)),
                               "ratio_min": min(t) / min(d), **meta[(v, c)]}
                        rows.append(row)
                        print(f"{name} b{b} {backend:12s} {v:8s} C={c:g}: {row['median_ms']:.2f} ms, ratio "
                              f"{row['ratio']:.3f} (minima {row['ratio_min']:.3f}), MACs {row['macs_ratio']:.3f}",
                              flush=True)
    print()
    print(_markdown(rows, args))
    for n in notes:
        print(f"- {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": rows, "notes": notes}, f, indent=1)
    return 0


def _markdown(rows: list[dict], args) -> str:
    """One row per model, batch, backend and C: each variant's latency ratio to dense, and MACs."""
    variants = [v for v in args.variants if v != "dense"]
    head = "| model | batch | backend | C | dense ms | " + " | ".join(variants) + " | MACs | default / MACs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by = {(r["model"], r["batch"], r["backend"], r["variant"], r["compress"]): r for r in rows}
    for (m, b, be, v, _), r in by.items():
        if v != "dense":
            continue
        for cc in args.compress:
            cells = [f"{by[(m, b, be, vv, cc)]['ratio']:.2f}" if (m, b, be, vv, cc) in by else "-" for vv in variants]
            d = by.get((m, b, be, "default", cc))
            macs = f"{d['macs_ratio']:.2f}" if d else "-"
            lim = f"{d['ratio'] / d['macs_ratio']:.2f}" if d else "-"
            lines.append(f"| {m} | {b} | {be} | {cc:g} | {r['median_ms']:.1f} | " + " | ".join(cells)
                         + f" | {macs} | {lim} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
