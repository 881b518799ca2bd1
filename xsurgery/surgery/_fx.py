"""Roles of layers by data flow in a torch.fx trace: the stem, the classifier, direct weight use.

timm's registered no-trace leaf modules and functions are honoured. When tracing fails,
:func:`fallback_roles` decides by module order (and timm's ``get_classifier``).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import X_LAYERS, layer_kind

__all__ = ["Trace", "fallback_roles", "trace_roles"]

_LEARNED_FUNCS = {torch.nn.functional.embedding, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm, torch.addmm, torch.mm,
                  operator.matmul, torch.nn.functional.linear, torch.nn.functional.conv1d,
                  torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                  torch.nn.functional.scaled_dot_product_attention}
_LEARNED_METHODS = {"matmul", "bmm", "mm", "__matmul__", "baddbmm"}


@dataclass
class Trace:
    """What the trace found (``ok`` False: fx failed and ``error`` says why)."""

    ok: bool
    stems: set[str]
    classifiers: set[str]
    error: str | None = None
    direct: set[str] = field(default_factory=set)  # layers whose weights the graph reads itself
    # layer -> the layer that alone reads its output through per-channel ops (norms, activations,
    # pools, dropout, depthwise convs); and per layer the node its input comes from and the node
    # its output goes into, both found through such ops (see :func:`channel_paths`)
    links: dict[str, str] = field(default_factory=dict)
    ends: dict[str, tuple[str, str]] = field(default_factory=dict)


def _tracer_for(model: nn.Module) -> torch.fx.Tracer:
    leaf: tuple[type, ...] = ()
    autowrap: tuple = ()
    if type(model).__module__.startswith("timm"):
        from timm.layers import _fx as timm_fx

        leaf = tuple(timm_fx.get_notrace_modules())
        autowrap = tuple(timm_fx.get_notrace_functions())

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            # conv/linear subclasses (torchvision's Conv3DSimple, transformers' Conv1D) are
            # layers, not code to trace through: their weight would otherwise look read
            # directly. Whether a subclass's forward is safe to replace is decided elsewhere.
            return isinstance(m, leaf) or _is_layer(m) or super().is_leaf_module(m, qualname)

    return Tracer(autowrap_functions=autowrap)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, X_LAYERS) or layer_kind(m) is not None


def _is_conv(m: nn.Module) -> bool:
    return _is_layer(m) and hasattr(m, "kernel_size")


def trace_roles(model: nn.Module) -> Trace:
    """Stems and classifiers by data flow in the fx graph."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _tracer_for(model).trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, AttributeError, ...)
        return Trace(False, set(), set(), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    modules = dict(model.named_modules())

    def learned(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            m = modules.get(node.target)  # a layer, or any module with a learned matrix (an embedding)
            return m is not None and (_is_layer(m) or any(_is_layer(c) for c in m.modules())
                                      or any(p.dim() >= 2 for p in m.parameters()))
        if node.op == "call_function":
            return node.target in _LEARNED_FUNCS
        if node.op == "call_method":
            return node.target in _LEARNED_METHODS
        return False

    def is_layer_node(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and _is_layer(modules.get(node.target, nn.Identity()))

    nodes = list(graph.nodes)
    upstream: dict[torch.fx.Node, bool] = {}
    from_input: dict[torch.fx.Node, bool] = {}
    stems: set[str] = set()
    for node in nodes:
        ins = node.all_input_nodes
        upstream[node] = any(upstream[i] or learned(i) for i in ins)
        from_input[node] = node.op == "placeholder" or any(from_input[i] for i in ins)
        if is_layer_node(node) and not upstream[node] and from_input[node]:
            stems.add(node.target)  # a conv, or a Linear / Conv1d reading the raw input
    downstream: dict[torch.fx.Node, bool] = {}
    reaches_output: dict[torch.fx.Node, bool] = {}
    classifiers: set[str] = set()
    for node in reversed(nodes):
        users = list(node.users)
        downstream[node] = any(downstream[u] or learned(u) for u in users)
        reaches = node.op == "output" or any(u.op == "output" or reaches_output.get(u, False) for u in users)
        reaches_output[node] = reaches
        if is_layer_node(node) and not downstream[node] and reaches:
            classifiers.add(node.target)
    direct = {str(n.target).rpartition(".")[0] for n in nodes if n.op == "get_attr"}
    links, ends = channel_paths(nodes, modules)
    return Trace(True, stems, classifiers, direct=direct, links=links, ends=ends)


_PER_CHANNEL_MODULES = (
    nn.modules.batchnorm._NormBase, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_F = torch.nn.functional
_PER_CHANNEL_FUNCS = {_F.relu, torch.relu, _F.relu6, _F.gelu, _F.silu, _F.hardswish, _F.hardsigmoid,
                      torch.sigmoid, torch.tanh, _F.leaky_relu, _F.elu, _F.dropout, _F.batch_norm,
                      _F.max_pool2d, _F.avg_pool2d, _F.adaptive_avg_pool2d}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}


def channel_paths(nodes: list[torch.fx.Node], modules: dict[str, nn.Module]) -> tuple[dict, dict]:
    """Which layer alone reads each layer's output through per-channel ops, and where each
    layer's input comes from and its output goes (node names), through such ops.

    A per-channel op's output channel c depends on its input channel c only (norms,
    activations, pools, dropout, depthwise convs): reach through it is unchanged.
    """
    def per_channel(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            m = modules.get(node.target)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return m.groups == m.in_channels == m.out_channels
            return isinstance(m, _PER_CHANNEL_MODULES)
        if node.op == "call_function":
            return node.target in _PER_CHANNEL_FUNCS
        return node.op == "call_method" and node.target in _PER_CHANNEL_METHODS

    def tensor_input(node: torch.fx.Node) -> torch.fx.Node | None:
        first = node.args[0] if node.args else None
        return first if isinstance(first, torch.fx.Node) else None

    links: dict[str, str] = {}
    ends: dict[str, tuple[str, str]] = {}
    for node in nodes:
        if node.op != "call_module" or not _is_layer(modules.get(node.target, nn.Identity())) or per_channel(node):
            continue
        src = tensor_input(node)
        while src is not None and per_channel(src):
            src = tensor_input(src)
        out = node
        while len(out.users) == 1:
            (user,) = out.users
            if tensor_input(user) is out and per_channel(user):
                out = user
                continue
            if tensor_input(user) is out and user.op == "call_module" and _is_layer(modules.get(user.target, nn.Identity())):
                links[str(node.target)] = str(user.target)
            else:
                out = user  # where the output goes: an add, a concat, a reshape, ...
            break
        ends[str(node.target)] = ("" if src is None else src.name, out.name)
    return links, ends


def fallback_roles(model: nn.Module) -> Trace:
    """Without a trace: the first conv is the stem; the head is timm's classifier or the last layer."""
    stems: set[str] = set()
    classifiers: set[str] = set()
    layers = [(n, m) for n, m in model.named_modules() if _is_layer(m)]
    convs = [n for n, m in layers if _is_conv(m)]
    if convs:
        stems.add(convs[0])
    head = None
    if hasattr(model, "get_classifier"):
        try:
            head = model.get_classifier()
        except Exception:
            head = None
    if isinstance(head, nn.Module):
        ids = {id(m) for m in head.modules()}
        classifiers |= {n for n, m in layers if id(m) in ids}
    if not classifiers and layers:
        classifiers.add(layers[-1][0])
    return Trace(False, stems, classifiers)
