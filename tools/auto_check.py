"""Is ``export --layout auto`` ever slower than dense? Export the default X-model of each model,
compression and batch with ``layout="auto"`` and time the file against its dense export in
one process with the same session options (spinning off, the given threads): ``--rounds``
interleaved rounds; ratios of the medians, of the minima, and the median of the per-round
ratios (robust to a shared machine's drift).

    .venv/bin/python tools/auto_check.py --models resnet18 resnet50 mobilenet_v2 efficientnet_b0 \
        --compress 2 4 --batch 1 8 --threads 2 --json auto.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of file vs dense export")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from xsurgery.export import export_onnx
    from xsurgery.export._ort import _rounds, session
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
                        f, d = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "d.onnx")
                        res = export_onnx(model, f, example_inputs=x, threads=args.threads, verify=False,
                                          verbose=False, force=True)
                        export_s = time.perf_counter() - t0
                        export_onnx(model, d, example_inputs=x, layout="dense", verify=False, verbose=False, force=True)
                        sess = [session(f, args.threads), session(d, args.threads)]
                        s = _rounds(sess, {"input": x.numpy()}, budget_s=0.0, min_reps=args.rounds,
                                    max_reps=args.rounds, warmup=3)
                        med = [1e3 * statistics.median(v) for v in s]
                        per_round = statistics.median(a / b for a, b in zip(*s))
                        n_g = sum(v == "gather" for v in res.layers.values())
                        row = {"model": name, "compress": c, "batch": b, "repeat": rep, "pick": res.auto_pick,
                               "gather_layers": n_g, "layers": len(res.layers), "median_ms": med[0],
                               "dense_median_ms": med[1], "ratio_median": med[0] / med[1],
                               "ratio_min": min(s[0]) / min(s[1]), "ratio_per_round": per_round,
                               "candidates_ms": res.model_timings_ms, "export_s": export_s,
                               "loadavg": os.getloadavg()[0]}
                        rows.append(row)
                        print(f"{name:16s} C={c:g} b={b} #{rep}: pick {res.auto_pick} ({n_g}/{len(res.layers)} gather) "
                              f"file/dense: medians {row['ratio_median']:.3f} ({med[0]:.2f} / {med[1]:.2f} ms), "
                              f"minima {row['ratio_min']:.3f}, per-round {per_round:.3f}; "
                              f"candidates {res.model_timings_ms}; load {row['loadavg']:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
