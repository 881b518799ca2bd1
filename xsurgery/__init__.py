"""xsurgery: make any torchvision/timm model expander-sparse before training.

Data flows graphs -> layers -> surgery -> analysis -> export -> train -> cli.
"""

from ._version import __version__
from .graphs import BipartiteGraph, build_graph, list_graphs, register_graph
from .layers import XConv2d, XLinear

__all__ = [
    "BipartiteGraph",
    "XConv2d",
    "XLinear",
    "__version__",
    "build_graph",
    "list_graphs",
    "register_graph",
]
