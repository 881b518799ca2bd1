"""xsurgery: make any torch model expander-sparse before training.

One folder per stage, data flowing one way through them: the flow, the folders and where each
extension point's registry lives are in the README's Layout section.
"""

from ._version import __version__
from .errors import UserError
from .graphs import BipartiteGraph, build_graph, list_graphs, register_graph
from .layers import SparsityConfig, XConv1d, XConv2d, XConv3d, XLinear


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
    if name == "hf":  # xsurgery.hf.from_pretrained(folder)
        from .checkpoint import hf

        return hf
    raise AttributeError(f"module 'xsurgery' has no attribute {name!r}")


__all__ = [
    "BipartiteGraph",
    "SparsityConfig",
    "UserError",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XLinear",
    "__version__",
    "build_graph",
    "convert",
    "hf",
    "load",
    "report",
    "save",
    "list_graphs",
    "register_graph",
]
