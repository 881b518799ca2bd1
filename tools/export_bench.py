"""ORT latency of exported X-models against their dense originals (issue 4's closing numbers).

    .venv/bin/python tools/export_bench.py                      # X-ResNet-50, C = 2 and 4, k = 2, 224x224
    .venv/bin/python tools/export_bench.py --model resnet18 --compress 2 --layouts gather auto dense

For each compression and layout it exports with ``benchmark=True``: the exported model and
the dense original (every X-layer as ``to_dense()``) are exported the same way and timed in
ORT in the same run (interleaved, warm-up, median), so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--compress", type=float, nargs="+", default=[2, 4])
    p.add_argument("--mixing", type=int, default=2)
    p.add_argument("--layouts", nargs="+", default=["gather", "auto"])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="static batch (default: dynamic, timed at batch 1)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default ORT's)")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore")
    import onnxruntime
    import torch

    from xsurgery.export import export_onnx
    from xsurgery.layers import XConv2d
    from xsurgery.surgery import convert

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.compress:
            model, _ = convert(args.model, compress=c, mixing=args.mixing, input_size=args.input_size, check=False)
            kinds = {n: ("1x1" if m.kernel_size == (1, 1) else "kxk") if isinstance(m, XConv2d) else "linear"
                     for n, m in model.named_modules() if hasattr(m, "graph_name")}
            for layout in args.layouts:
                print(f"\n== {args.model} C={c:g} k={args.mixing} layout={layout}")
                res = export_onnx(model, os.path.join(tmp, f"m_{c}_{layout}.onnx"), input_size=args.input_size,
                                  layout=layout, static_batch=args.batch, benchmark=True, threads=args.threads,
                                  verbose=True)
                by_kind = collections.Counter((kinds[n], v) for n, v in res.layers.items())
                rows.append({"compress": c, "layout": layout, "latency_ms": res.latency_ms,
                             "dense_latency_ms": res.dense_latency_ms, "ratio": res.latency_ratio,
                             "gather_layers": sum(v == "gather" for v in res.layers.values()),
                             "layers": len(res.layers), "by_kind": {f"{k}:{v}": n for (k, v), n in by_kind.items()},
                             "layer_timings_ms": res.layer_timings_ms, "max_rel_err": res.max_rel_err})
    print("\ncompress  layout  exported_ms  dense_ms  ratio  gather/layers  choices by kind")
    for r in rows:
        print(f"{r['compress']:>8g}  {r['layout']:<6}  {r['latency_ms']:>11.2f}  {r['dense_latency_ms']:>8.2f}  "
              f"{r['ratio']:>5.3f}  {r['gather_layers']:>6}/{r['layers']:<6}  {r['by_kind']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
