"""Where the ORT time goes: per op type, from ONNX Runtime's own profiler.

    .venv/bin/python tools/ort_profile.py --model resnet50 --compress 4 --batch 1 --threads 2 \
        --variants grouped x-k1 default

Each variant is converted as ``xsurgery bench`` does, exported with ``layout="gather"``
(``dense`` for the dense model) and run ``--runs`` times in a session with the benchmark's
options (spinning off) and profiling on; the share of each op type in the summed kernel time
is printed (ORT's fused ops keep their own names: ``FusedConv``, ``ReorderInput``, ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def profile(path: str, feed: dict, threads: int, runs: int) -> dict[str, float]:
    """Summed kernel microseconds per op type over ``runs`` runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(os.path.dirname(path), "prof")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        sess.run(None, feed)
    out = sess.end_profiling()
    with open(out) as f:
        events = json.load(f)
    os.remove(out)
    per_op: dict[str, float] = collections.Counter()
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    skip_before = runs_seen[3]["ts"] if len(runs_seen) > 3 else 0  # leave out the warm-up runs
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= skip_before:
            per_op[e["args"]["op_name"]] += e["dur"]
    return dict(per_op)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--compress", type=float, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=["dense", "grouped", "x-k1", "default"])
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from xsurgery.bench import VARIANT_OPTIONS
    from xsurgery.checkpoint import resolve_model
    from xsurgery.export import export_onnx
    from xsurgery.surgery import convert

    dense = resolve_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            m = dense if v == "dense" else convert(dense, compress=args.compress, example_inputs=x,
                                                   **VARIANT_OPTIONS[v])[0]
            path = os.path.join(tmp, f"{v}.onnx")
            export_onnx(m, path, example_inputs=x, layout="dense" if v == "dense" else "gather", verify=False,
                        verbose=False, threads=args.threads)
            per_op = profile(path, {"input": x.numpy()}, args.threads, args.runs)
            total = sum(per_op.values())
            table[v] = {"total_ms_per_run": total / args.runs / 1e3,
                        "share": {k: round(t / total, 4) for k, t in sorted(per_op.items(), key=lambda kv: -kv[1])}}
            shares = ", ".join(f"{k} {100 * s:.0f}%" for k, s in table[v]["share"].items() if s >= 0.005)
            print(f"{args.model} C={args.compress:g} b={args.batch} {v:8s} {table[v]['total_ms_per_run']:7.2f} ms "
                  f"kernel time/run: {shares}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
