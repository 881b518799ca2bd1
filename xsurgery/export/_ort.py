"""ONNX Runtime sessions and timing; the per-layer gather/dense choice of ``layout="auto"``."""

from __future__ import annotations

import statistics
import time

import torch

from ._forms import _layer_form
from ._trace import _to_bytes

# auto keeps gather only when it wins by this factor: closer than that is timing noise, and
# dense is the form every runtime supports
GATHER_MARGIN = 0.95
LAYER_TIMING_S = 0.1  # per X-layer and form, after warm-up (auto)
MODEL_TIMING_S = 1.0  # auto's whole-model check of the mix against all-dense and all-gather
BENCHMARK_S = 3.0


def _session(model: str | bytes, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or 0)  # 0 = ORT's default (one per physical core)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def _time_sessions(sessions: list, feed: dict, *, budget_s: float, min_reps: int = 5, max_reps: int = 200,
                   warmup: int = 3, stat: str = "median") -> list[float]:
    """Median (or min) ms of each session, run interleaved (round robin) so drift hits all alike."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while True:
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t)
        n = len(times[0])
        if n >= max_reps or (n >= min_reps and time.perf_counter() - start > budget_s):
            break
    reduce = min if stat == "min" else statistics.median
    return [1e3 * reduce(t) for t in times]


def _choose_layouts(layers, shapes, inner, opset, threads, log) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Time gather vs dense of every X-layer alone (its input shape at the export batch)."""
    choices, timings = {}, {}
    gen = torch.Generator().manual_seed(1)
    for name, layer in layers:
        if not shapes[name]:  # never called in forward: nothing to time, dense is safe
            choices[name] = "dense"
            continue
        xin = torch.randn(shapes[name][0], generator=gen).to(layer.weight.dtype)
        sessions = [_session(_to_bytes(_layer_form(layer, form, inner.get(name)).eval(), xin, opset), threads)
                    for form in ("gather", "dense")]
        # min, not median: a layer runs for microseconds to milliseconds, and on a shared machine
        # one preemption is longer than that; the fastest run is what each form can do
        g_ms, d_ms = _time_sessions(sessions, {"input": xin.numpy()}, budget_s=LAYER_TIMING_S, min_reps=10,
                                    stat="min")
        choices[name] = "gather" if g_ms < GATHER_MARGIN * d_ms else "dense"
        timings[name] = {"gather": round(g_ms, 4), "dense": round(d_ms, 4)}
        log(f"  {name:<40} gather {g_ms:8.3f} ms  dense {d_ms:8.3f} ms  -> {choices[name]}")
    return choices, timings
