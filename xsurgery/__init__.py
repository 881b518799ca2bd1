"""xsurgery: make any torchvision/timm model expander-sparse before training.

Data flows graphs -> layers -> surgery -> analysis -> export -> train -> cli.
"""

from ._version import __version__
from .graphs import BipartiteGraph, build_graph, list_graphs, register_graph
from .layers import XConv1d, XConv2d, XConv3d, XLinear


def __getattr__(name):
    # the heavier stages load on first use, so `import xsurgery` stays fast
    if name == "convert":
        from .surgery import convert

        return convert
    if name == "report":
        from .analysis import report

        return report
    if name in ("save", "load"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'xsurgery' has no attribute {name!r}")


__all__ = [
    "BipartiteGraph",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XLinear",
    "__version__",
    "build_graph",
    "convert",
    "load",
    "report",
    "save",
    "list_graphs",
    "register_graph",
]
