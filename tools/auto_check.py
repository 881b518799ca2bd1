"""Is ``export --layout auto`` ever slower than dense? Export the default X-model of each model,
compression and batch with ``layout="auto"`` and time the file against its dense export in
one process with the same session options (``benchmark=True``: spinning off, the given threads).

    .venv/bin/python tools/auto_check.py --models resnet18 resnet50 mobilenet_v2 efficientnet_b0 \
        --compress 2 4 --batch 1 8 --threads 2 --json auto.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"])
    p.add_argument("--compress", type=float, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="exports per case (does auto's pick repeat?)")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from xsurgery.export import export_onnx
    from xsurgery.surgery import convert

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for c in args.compress:
                model, _ = convert(name, compress=c, input_size=args.input_size, check=False)
                for b in args.batch:
                    for rep in range(args.repeat):
                        x = torch.randn(b, 3, args.input_size, args.input_size)
                        t0 = time.perf_counter()
                        res = export_onnx(model, os.path.join(tmp, "m.onnx"), example_inputs=x, benchmark=True,
                                          threads=args.threads, verify=False, verbose=False, force=True)
                        n_g = sum(v == "gather" for v in res.layers.values())
                        row = {"model": name, "compress": c, "batch": b, "repeat": rep, "pick": res.auto_pick,
                               "gather_layers": n_g, "layers": len(res.layers), "ratio": res.latency_ratio,
                               "latency_ms": res.latency_ms, "dense_latency_ms": res.dense_latency_ms,
                               "candidates_ms": res.model_timings_ms, "export_s": time.perf_counter() - t0,
                               "loadavg": os.getloadavg()[0]}
                        rows.append(row)
                        print(f"{name:16s} C={c:g} b={b} #{rep}: pick {res.auto_pick} ({n_g}/{len(res.layers)} gather) "
                              f"ratio {res.latency_ratio:.3f} ({res.latency_ms:.2f} / {res.dense_latency_ms:.2f} ms); "
                              f"candidates {res.model_timings_ms}; load {row['loadavg']:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
