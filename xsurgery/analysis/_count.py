"""The counting machinery of :mod:`xsurgery.analysis`: rows, module shapes, aten-level matmuls.

Forward pre/post hooks keep a module stack; a counted module (conv, linear, X-layer,
transformers' Conv1D) gets its MACs from its shapes, and a ``TorchDispatchMode`` counts the
matmul-like aten ops that run outside counted modules, attributed to the innermost module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..graphs import BipartiteGraph, spectral_gap
from ..layers import X_LAYERS, XLinear, kind_family, layer_kind, x_layer_kind

__all__ = ["LayerRow", "cached_spectral_gap"]

_X = X_LAYERS


def _is_counted(m: nn.Module) -> bool:
    """Counted from its shapes: a registered layer kind (transformers' Conv1D is a linear stored
    ``[in, out]``), its X-layer, or any other conv (transposed, grouped)."""
    return isinstance(m, (nn.modules.conv._ConvNd, *X_LAYERS)) or layer_kind(m) is not None


# --------------------------------------------------------------------------- rows


@dataclass
class LayerRow:
    """One layer (or one module's functional matmuls) of the report."""

    name: str
    kind: str
    converted: bool = False
    reason: str | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    kernel: list[int] | None = None
    degree: int | None = None
    blocks: int | None = None
    graph: str | None = None
    spectral_gap: float | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    mixing: float | None = None
    calls: int = 0
    projected: bool = False
    note: str | None = None
    seed: int | None = None
    execution: str | None = None  # X-layers: "gather" or "masked", as the layer resolves it where it lives
    macs_executed: int | None = None  # MACs the execution computes (masked: the dense MACs); None: macs_after
    precision: str | None = None  # an exported file's quantized layers: "int8" (QDQ around the node); None: float

    @property
    def executed_macs(self) -> int:
        """MACs actually computed: ``macs_executed``, or ``macs_after`` where nothing else runs."""
        return self.macs_after if self.macs_executed is None else self.macs_executed

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops_before"], d["flops_after"] = self.flops_before, self.flops_after
        d["macs_executed"] = self.executed_macs
        return d


_GAP_CACHE: dict[str, float] = {}


def cached_spectral_gap(graph: BipartiteGraph) -> float:
    """:func:`xsurgery.graphs.spectral_gap`, memoised on the graph's hash (an eigensolve of a
    2048-block ``exact`` graph takes seconds; reports are built and rendered repeatedly)."""
    key = graph.hash()
    if key not in _GAP_CACHE:
        if len(_GAP_CACHE) > 4096:
            _GAP_CACHE.clear()
        _GAP_CACHE[key] = spectral_gap(graph)
    return _GAP_CACHE[key]


def _conv_kind(m: nn.Module) -> str:
    groups = getattr(m, "groups", 1)
    if groups > 1:
        return "depthwise" if groups == m.in_channels else "grouped"
    return "pointwise" if all(k == 1 for k in m.kernel_size) else "conv"


def _module_row(name: str, m: nn.Module) -> LayerRow:
    """The static part of a counted module's row (MACs are added while it runs)."""
    bias = 0 if getattr(m, "bias", None) is None else m.bias.numel()
    if isinstance(m, _X):
        kernel = None if isinstance(m, XLinear) else list(m.kernel_size)
        area = math.prod(kernel) if kernel else 1
        return LayerRow(
            name=name, kind=m.kind, converted=True,
            in_channels=m.in_features, out_channels=m.out_features, kernel=kernel, degree=m.degree,
            blocks=m.blocks, graph=m.graph_name, spectral_gap=cached_spectral_gap(m.graph), mixing=m.mixing,
            params_before=m.out_features * m.in_features * area + bias, params_after=m.weight.numel() + bias,
            execution=m.resolved_execution(), macs_executed=0,
        )
    # all its own parameters: a parametrization's (weight_norm's g and v), a pruned weight_orig
    params = sum(p.numel() for p in m.parameters())
    kind = layer_kind(m)
    cin, cout, kernel = kind.shape(m) if kind is not None else (m.in_channels, m.out_channels, list(m.kernel_size))
    family = kind_family(m) if kind is not None else _conv_kind(m)
    return LayerRow(name=name, kind=family, in_channels=cin, out_channels=cout, kernel=kernel,
                    params_before=params, params_after=params)


def _module_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(before, after) MACs of one call of a counted module."""
    if isinstance(m, _X):
        return x_layer_kind(m).x_macs(m, out)
    kind = layer_kind(m)
    if kind is not None:
        macs = kind.macs(m, inp, out)
        return macs, macs
    k = math.prod(m.kernel_size)
    if getattr(m, "transposed", False):  # every input element scatters into C_out/groups * k outputs
        macs = inp.numel() * (m.out_channels // m.groups) * k
    else:
        macs = out.numel() * (m.in_channels // m.groups) * k
    return macs, macs


# --------------------------------------------------------------------------- functional ops


def _aten_macs() -> dict[Any, tuple[str, Any]]:
    aten = torch.ops.aten

    def mm(a, b, *_, **__):
        return a.shape[0] * a.shape[1] * b.shape[1]

    def addmm(_c, a, b, *_, **__):
        return mm(a, b)

    def bmm(a, b, *_, **__):
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]

    def baddbmm(_c, a, b, *_, **__):
        return bmm(a, b)

    def mv(a, v, *_, **__):
        return a.numel()

    def addmv(_c, a, v, *_, **__):
        return a.numel()

    def dot(a, b, *_, **__):
        return a.numel()

    def conv(x, w, *args, **kwargs):
        transposed = bool(args[4]) if len(args) > 4 else bool(kwargs.get("transposed", False))
        return (x, w, transposed)  # resolved with the output shape, see _FunctionalCounter

    def grouped_mm(a, b, *_, **__):  # MoE experts: each row of a meets one expert's [K, N] matrix
        return ("per_output", a.shape[-1])  # resolved with the output shape: out.numel() * K

    def sdpa(q, k, v, *_, **__):
        # q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev]: QK^T then (attn)V
        lead = math.prod(q.shape[:-2])
        return lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])

    table: dict[Any, tuple[str, Any]] = {}
    for name, fn, kind in [
        ("mm", mm, "matmul"), ("addmm", addmm, "matmul"), ("bmm", bmm, "matmul"), ("baddbmm", baddbmm, "matmul"),
        ("mv", mv, "matmul"), ("addmv", addmv, "matmul"), ("dot", dot, "matmul"), ("vdot", dot, "matmul"),
        ("_grouped_mm", grouped_mm, "matmul"), ("convolution", conv, "functional"), ("_convolution", conv, "functional"),
        ("_scaled_dot_product_flash_attention", sdpa, "attention"),
        ("_scaled_dot_product_flash_attention_for_cpu", sdpa, "attention"),
        ("_scaled_dot_product_efficient_attention", sdpa, "attention"),
        ("_scaled_dot_product_cudnn_attention", sdpa, "attention"),
        ("_scaled_dot_product_fused_attention_overrideable", sdpa, "attention"),
    ]:
        packet = getattr(aten, name, None)
        if packet is not None:
            for overload in packet.overloads():
                table[getattr(packet, overload)] = (kind, fn)
    return table


_ATEN: dict[Any, tuple[str, Any]] | None = None


class _FunctionalCounter(TorchDispatchMode):
    """Counts matmul-like aten ops run outside counted modules, per innermost module."""

    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        entry = _ATEN.get(func) if _ATEN is not None else None  # type: ignore[union-attr]
        if entry is None or self.tracker.inside_counted:
            return out
        kind, fn = entry
        macs = fn(*args, **kwargs)
        if isinstance(macs, tuple) and macs[0] == "per_output":
            macs = out.numel() * int(macs[1])
        elif isinstance(macs, tuple):  # convolution: needs the output shape
            x, w, transposed = macs
            macs = x.numel() * w.shape[0] * math.prod(w.shape[2:]) if transposed else \
                out.numel() * math.prod(w.shape[1:])
        self.tracker.add_functional(kind, int(macs))
        return out


class _Tracker:
    """Module stack from forward pre/post hooks; accumulates rows."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.inside_counted = 0
        self.rows: dict[tuple[str, str], LayerRow] = {}
        self.module_rows: dict[int, LayerRow] = {}
        self.handles: list[Any] = []
        for n, m in model.named_modules():
            if _is_counted(m) and id(m) not in self.module_rows:
                row = _module_row(n, m)
                self.module_rows[id(m)] = row
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))
        self.order: list[LayerRow] = []

    def _pre(self, m: nn.Module, args) -> None:
        self.stack.append(m)
        if id(m) in self.module_rows:
            self.inside_counted += 1

    def _post(self, m: nn.Module, args, out) -> None:
        if self.stack and self.stack[-1] is m:
            self.stack.pop()
        row = self.module_rows.get(id(m))
        if row is None:
            return
        self.inside_counted -= 1
        if not isinstance(out, torch.Tensor) or self.inside_counted:
            return  # a counted module inside another counted one: the outer one's formula covers it
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else out
        before, after = _module_macs(m, inp, out)
        if out.numel() == 0 and row.note is None:  # e.g. a detection head with no proposals on this example
            row.note = "ran on 0 rows of the example (a value-dependent path): its MACs are that run's"
        if row.calls == 0:
            self.order.append(row)
        row.calls += 1
        row.macs_before += before
        row.macs_after += after
        if row.macs_executed is not None:  # X-layers: masked execution is a dense conv on a zero-filled weight
            row.macs_executed += before if row.execution == "masked" else after

    def add_functional(self, kind: str, macs: int) -> None:
        name = self.names.get(id(self.stack[-1]), "") if self.stack else ""
        row = self.rows.get((name, kind))
        if row is None:
            row = self.rows[(name, kind)] = LayerRow(name=name, kind=kind)
            self.order.append(row)
        row.calls += 1
        row.macs_before += macs
        row.macs_after += macs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def all_rows(self) -> list[LayerRow]:
        """Rows in execution order, then counted modules that never ran (MACs 0)."""
        seen = {id(r) for r in self.order}
        return self.order + [r for r in self.module_rows.values() if id(r) not in seen]
