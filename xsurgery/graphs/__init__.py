"""Expander graphs: bipartite graphs of inputs to blocks, built by registered constructions, and their spectra."""

from __future__ import annotations

from ._core import (
    BipartiteGraph,
    build_graph,
    cayley_spectrum,
    choose_blocks,
    degree_for,
    input_coverage,
    layer_seed,
    list_graphs,
    register_graph,
    sensitivity_depth,
    spectral_gap,
)

__all__ = [
    "BipartiteGraph",
    "build_graph",
    "cayley_spectrum",
    "choose_blocks",
    "degree_for",
    "input_coverage",
    "layer_seed",
    "list_graphs",
    "register_graph",
    "sensitivity_depth",
    "spectral_gap",
]
