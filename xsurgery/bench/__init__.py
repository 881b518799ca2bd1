"""Latency benchmarks: X-models against dense and grouped, as ratios, all in one process.

``bench(model, compress)`` builds every requested variant of one model (dense, grouped,
X with mixing 1/2/4, X exact, masked-dense, and the library default), times each with torch
eager inference, a torch training step (forward + backward) and ONNX Runtime (or any runtime
of :mod:`xsurgery.export.runtimes`: ``openvino``, each file exported for the runtime it is
timed in), and reports median and spread per (variant, backend) with the ratio to dense and
the MACs ratio, which is the limit a sparse layer could reach.

``bench`` runs in phases: build the variants -> export them (one runner per variant and
backend) -> measure -> the rows.

Timings are interleaved: each repetition runs every (variant, backend) once, so a load
change on a shared machine moves all of them alike and the ratios stay comparable.
"""

from __future__ import annotations

from ._frontier import pareto_front
from ._measure import (
    Timing,
    count_macs,
    machine_info,
    measure,
    ort_runner,
    ov_runner,
    runtime_runner,
    torch_runner,
    train_runner,
    versions,
)
from ._output import csv_table, markdown_table, plot, print_table, write_json
from ._run import ALL_BACKENDS, ALL_VARIANTS, BACKENDS, INT8_VARIANTS, ORT_LAYOUTS, VARIANT_OPTIONS, VARIANTS, bench
from ._variants import Variant
from .sweep import SweepRun, check_finished, plan_sweep, sweep, train_runs

__all__ = [
    "ALL_BACKENDS",
    "ALL_VARIANTS",
    "BACKENDS",
    "INT8_VARIANTS",
    "ORT_LAYOUTS",
    "Timing",
    "VARIANTS",
    "VARIANT_OPTIONS",
    "bench",
    "count_macs",
    "csv_table",
    "machine_info",
    "markdown_table",
    "measure",
    "ort_runner",
    "ov_runner",
    "plot",
    "print_table",
    "runtime_runner",
    "torch_runner",
    "train_runner",
    "versions",
    "write_json",
    "pareto_front",
    "plan_sweep",
    "sweep",
    "SweepRun",
    "Variant",
    "check_finished",
    "train_runs",
]
