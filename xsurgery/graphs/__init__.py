"""Expander graphs: which inputs each block of outputs reads, built by registered constructions
(each declaring its own constraints), and what they do for a network (coverage, spectral gap,
sensitivity depth)."""

from __future__ import annotations

from . import _constructions  # noqa: F401  (registers auto, random, grouped, paired, exact, cayley)
from ._constructions import cayley_spectrum
from ._core import (
    BipartiteGraph,
    GraphConstruction,
    build_graph,
    choose_blocks,
    degree_for,
    graph_construction,
    layer_seed,
    list_graphs,
    min_covering_degree,
    register_graph,
    register_graph_chooser,
)
from ._spectral import input_coverage, sensitivity_depth, spectral_gap

__all__ = [
    "BipartiteGraph",
    "GraphConstruction",
    "build_graph",
    "cayley_spectrum",
    "choose_blocks",
    "min_covering_degree",
    "degree_for",
    "graph_construction",
    "input_coverage",
    "layer_seed",
    "list_graphs",
    "register_graph",
    "register_graph_chooser",
    "sensitivity_depth",
    "spectral_gap",
]
