"""ONNX Runtime sessions (its entry in :mod:`xsurgery.export.runtimes`) and the timing of
``layout="auto"``'s gather/dense choice, in whichever runtime's sessions it is given.

Every session here (auto's candidates, the verification, ``benchmark=True`` and ``xsurgery
bench``'s ORT rows) is made by :func:`session` with the same options: all graph
optimisations, sequential execution, one inter-op thread, the given intra-op threads and
**thread spinning off**. With spinning on, the idle pool threads of one session keep
spinning while the next session runs, so sessions timed one after another slow each other
down (a 39 ms ResNet-50 measured 77 ms that way) and the comparison says nothing about
either file run alone.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ._forms import DENSE, _layer_form, forms_of
from ._trace import _to_bytes

# auto keeps a gather form only when it beats all-dense by this factor (and in most paired
# rounds, see compare_sessions): closer than that is timing noise on a shared machine, and
# dense is the form every runtime supports
GATHER_MARGIN = 0.95
# among the gather candidates, all-gather is kept when within this factor of the fastest: it
# does not depend on the per-layer timings, so it repeats from one export to the next
PREFER_UNIFORM = 1.03
# share of paired rounds a candidate must win against all-dense (a sign test: interleaved
# rounds see the same load, so per-round comparisons cancel the machine's drift)
MIN_WIN_SHARE = 0.75
LAYER_TIMING_S = 0.1  # per X-layer and form, after warm-up (auto)
MODEL_TIMING_S = 1.0  # auto's whole-model comparison: at least this long (and >= MIN_ROUNDS rounds)
MODEL_TIMING_MAX_S = 10.0  # ... and at most this long while the ranking keeps changing
MIN_ROUNDS = 10
BENCHMARK_S = 3.0


def session(model: str | bytes, threads: int | None):
    """An ORT CPU session with the options every timing in xsurgery uses (spinning off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)  # 0 = ORT's default (one per physical core)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle pool threads must not spin: they would steal the cores from the next session timed
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                providers=["CPUExecutionProvider"])


def input_names(sess) -> list[str]:
    """The session's input names, in order."""
    return [i.name for i in sess.get_inputs()]


def _time_sessions(sessions: list, feed: dict, *, budget_s: float, min_reps: int = 5, max_reps: int = 200,
                   warmup: int = 3, stat: str = "median") -> list[float]:
    """Median (or min) ms of each session, run interleaved (round robin) so drift hits all alike."""
    samples = _rounds(sessions, feed, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps, warmup=warmup)
    reduce = min if stat == "min" else statistics.median
    return [1e3 * reduce(t) for t in samples]


def _rounds(sessions: list, feed: dict, *, budget_s: float, min_reps: int, max_reps: int, warmup: int,
            samples: list[list[float]] | None = None) -> list[list[float]]:
    """Interleaved rounds (each session once per round) until ``min_reps`` and ``budget_s``."""
    if samples is None:
        for s in sessions:
            for _ in range(warmup):
                s.run(None, feed)
        samples = [[] for _ in sessions]
    start = time.perf_counter()
    done = 0
    while True:
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feed)
            samples[i].append(time.perf_counter() - t)
        done += 1
        n = len(samples[0])
        if n >= max_reps or (done >= min_reps and time.perf_counter() - start > budget_s):
            return samples


@dataclass
class Comparison:
    """What :func:`compare_sessions` measured: medians (ms), rounds, and the pick."""

    names: list[str]
    median_ms: list[float]
    wins_vs_dense: list[float]  # share of rounds each candidate beat all-dense
    rounds: int
    pick: int
    reason: str


def _decide(names: list[str], samples: list[list[float]], dense: int) -> tuple[int, str]:
    med = [statistics.median(s) for s in samples]
    n = len(samples[0])
    wins = [sum(a < b for a, b in zip(s, samples[dense])) / n for s in samples]
    ok = [i for i in range(len(names)) if i != dense and med[i] <= GATHER_MARGIN * med[dense]
          and wins[i] >= MIN_WIN_SHARE]
    if not ok:
        best = min(range(len(med)), key=med.__getitem__)
        return dense, (f"no gather form beats all-dense by {100 * (1 - GATHER_MARGIN):.0f}% in "
                       f"{100 * MIN_WIN_SHARE:.0f}% of rounds (fastest: {names[best]})")
    fastest = min(ok, key=med.__getitem__)
    # the uniform candidates (all-gather, all-matmul, ...): the fastest of them when within noise
    uniform = [i for i in ok if names[i].startswith("all-")]
    best_uniform = min(uniform, key=med.__getitem__, default=None)
    if best_uniform is not None and med[best_uniform] <= PREFER_UNIFORM * med[fastest]:
        return best_uniform, (f"{names[best_uniform]} is within noise of the fastest and does not depend on "
                              "per-layer timings")
    return fastest, "fastest"


def compare_sessions(names: list[str], sessions: list, feed: dict, *, dense: int, budget_s: float | None = None,
                     max_s: float | None = None, warmup: int = 3) -> Comparison:
    """Time whole-model candidates until the pick is stable, and pick as :func:`_decide` says.

    Rounds are interleaved (each candidate once per round, spinning off); after every
    ``MIN_ROUNDS`` rounds past the first budget the pick is re-taken, and the timing stops
    when two successive picks agree or after ``max_s``.
    """
    budget_s = MODEL_TIMING_S if budget_s is None else budget_s
    max_s = MODEL_TIMING_MAX_S if max_s is None else max_s
    start = time.perf_counter()
    samples = _rounds(sessions, feed, budget_s=budget_s, min_reps=MIN_ROUNDS, max_reps=10_000, warmup=warmup)
    pick, reason = _decide(names, samples, dense)
    while time.perf_counter() - start < max_s:
        samples = _rounds(sessions, feed, budget_s=0.0, min_reps=MIN_ROUNDS, max_reps=10_000, warmup=0,
                          samples=samples)
        again, reason = _decide(names, samples, dense)
        if again == pick:
            break
        pick = again
    med = [1e3 * statistics.median(s) for s in samples]
    n = len(samples[0])
    wins = [sum(a < b for a, b in zip(s, samples[dense])) / n for s in samples]
    return Comparison(list(names), med, wins, n, pick, reason)


def _per_layer_choices(layers, shapes, inner, opset, threads, log, make=None
                    ) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Time every form of every X-layer alone (gather, its alternatives such as XLinear's matmul,
    dense; the layer's input shape at the export batch) and keep the fastest sparse form where it
    beats dense by ``GATHER_MARGIN``; ``make(model_bytes, threads)`` makes the runtime's session
    (default ORT's)."""
    make = make or session
    choices, timings = {}, {}
    gen = torch.Generator().manual_seed(1)
    from .._util.progress import progress  # a bar on terminals only (not in pipes, logs, --quiet)

    for name, layer in progress(layers, desc="timing X-layers in ORT"):
        if not shapes[name]:  # never called in forward: nothing to time, dense is safe
            choices[name] = DENSE
            continue
        xin = torch.randn(shapes[name][0], generator=gen).to(layer.weight.dtype)
        forms = forms_of(layer)
        sessions = [make(_to_bytes(_layer_form(layer, form, inner.get(name)).eval(), xin, opset), threads)
                    for form in forms]
        # min, not median: a layer runs for microseconds to milliseconds, and on a shared machine
        # one preemption is longer than that; the fastest run is what each form can do
        ms = dict(zip(forms, _time_sessions(sessions, {"input": xin.numpy()}, budget_s=LAYER_TIMING_S,
                                            min_reps=10, stat="min")))
        best = min((f for f in forms if f != DENSE), key=ms.__getitem__)
        choices[name] = best if ms[best] < GATHER_MARGIN * ms[DENSE] else DENSE
        timings[name] = {f: round(t, 4) for f, t in ms.items()}
        log(f"  {name:<40} " + "  ".join(f"{f} {t:8.3f} ms" for f, t in ms.items()) + f"  -> {choices[name]}")
    return choices, timings
