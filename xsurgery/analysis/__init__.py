"""Analysis: params/MACs/FLOPs reports, their rendering and plots, ONNX file reports, and connectivity."""

from __future__ import annotations

from ._connectivity import ReachRow, grouped_baseline, main_path, reach_rows, x_layers
from ._onnx_report import onnx_layer_of, onnx_report
from ._plot import plot_layer_graph, plot_reach, plot_report
from ._render import (
    DEFAULT_MAX_ROWS,
    FORMATS,
    Grid,
    collapse_rows,
    emit_grid,
    emit_json,
    fit_grid,
    human,
    render_report,
    report_csv,
    report_markdown,
)
from ._report import LayerRow, Report, cached_spectral_gap, default_input_size, report

__all__ = [
    "DEFAULT_MAX_ROWS",
    "FORMATS",
    "Grid",
    "LayerRow",
    "ReachRow",
    "Report",
    "cached_spectral_gap",
    "collapse_rows",
    "default_input_size",
    "emit_grid",
    "emit_json",
    "fit_grid",
    "grouped_baseline",
    "human",
    "main_path",
    "onnx_layer_of",
    "onnx_report",
    "plot_layer_graph",
    "plot_reach",
    "plot_report",
    "reach_rows",
    "render_report",
    "report",
    "report_csv",
    "report_markdown",
    "x_layers",
]
