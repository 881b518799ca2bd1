"""The sweep's measuring phase: per run top-1, params and MACs; per variant one exported file
timed as a ratio to dense, all files interleaved in one process."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from ._sweep_runs import SweepRun, curve, result, slug
from ._variants import Variant

__all__ = ["measure_runs"]


def measure_runs(runs: list[SweepRun], out: str, runtime: str | None, batches: Sequence[int], threads: int,
                 repeat: int, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]]]:
    """Per run: top-1, params, MACs; per batch and variant: its first seed's file's latency / dense
    (every batch's files timed in one interleaved run; nothing when not measured)."""
    import torch

    from ..analysis import report
    from ..checkpoint import load
    from ..train import BEST

    rows, models = [], {}
    for run in runs:
        if not run.done:
            continue
        model = load(os.path.join(run.folder, BEST))
        size = tuple(run.recipe["data"]["input_size"])
        totals = report(model, input_size=size).totals
        params, macs = int(totals["params_after"]), int(totals["macs_after"])
        if run.variant.accuracy_only:  # masked dense: its nonzero parameters; no MACs, no latency
            params -= sum(int((p == 0).sum()) for p in model.parameters() if p.dim() > 1)
            macs = math.nan
        rows.append({"variant": run.variant.name, "family": run.variant.family, "seed": run.seed,
                     "folder": run.folder, "params": params, "macs": macs, "accuracy_only": run.variant.accuracy_only,
                     "curve": curve(run), **result(run)})
        if not run.variant.accuracy_only:
            models.setdefault(run.variant.name, (model, size, run.variant))
    if runtime is None or not models:
        return rows, {}
    dense = _reference(models)
    if dense is None:
        log("sweep: no dense variant finished; latency is not measured (add 'dense' or 'dense@1')")
        return rows, {}
    from .._util.progress import Bar
    from ..export import export_onnx
    from ._measure import measure, runtime_runner

    folder = os.path.join(out, "onnx")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    with Bar(total=len(models), desc="sweep: exporting") as bar:
        for name, (model, size, _) in models.items():  # one file per variant (dynamic batch), its layout chosen at
            paths[name] = os.path.join(folder, f"{slug(name)}.onnx")  # the first batch
            export_onnx(model, paths[name], example_inputs=torch.randn(batches[0], *size), force=True, verbose=False,
                        runtime=runtime, threads=threads)
            bar.update(1, info=name)
    busy = _busy()
    if busy:
        log(f"sweep: {busy}; latencies taken now are not to be trusted: run the sweep again on a quiet machine "
            f"(finished runs are skipped, only the timing is redone)")
    ratios = {}
    for batch in batches:
        runners = {name: runtime_runner(runtime, path, torch.randn(batch, *models[name][1]), threads)
                   for name, path in paths.items()}
        timings = measure(runners, repeat=repeat)
        ratios[batch] = {n: t.median_ms / timings[dense].median_ms for n, t in timings.items()}
    return rows, ratios


def _busy() -> str | None:
    """A description of the load when other work competes for the cores (None: quiet enough)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"the machine is busy (load {load:.1f} on {cores} cores)" if load > 0.75 * cores else None


def _reference(models: dict[str, tuple[Any, Any, Variant]]) -> str | None:
    """The dense model latencies are divided by: ``dense@1``, else a recipe variant ``dense``
    without X-layers."""
    from ..layers import X_LAYERS

    for name, (_model, _, v) in models.items():
        if v.family == "dense" and v.value == 1:
            return name
    for name, (model, _, _v) in models.items():
        if name == "dense" and not any(isinstance(m, X_LAYERS) for m in model.modules()):
            return name
    return None
