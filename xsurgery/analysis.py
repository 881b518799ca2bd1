"""The params / MACs / FLOPs report of a (possibly converted) model.

One forward pass on a random input counts, per layer, parameters and multiply-accumulates
(MACs; FLOPs = 2 x MACs), before and after the surgery:

* modules: ``nn.Conv*`` / ``nn.Linear`` from their shapes, X-layers from their degree
  (before = the dense layer they replace);
* everything else that multiplies matrices (``q @ k.T``, ``bmm``, ``einsum``,
  ``F.scaled_dot_product_attention``, ``F.linear`` outside a module, ...) at the aten level,
  attributed to the innermost module running; those rows are never converted.

Ops run inside a counted module are not counted again, so an X-layer's masked execution
(a dense conv on a mostly-zero weight) still counts its sparse MACs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._inputs import default_input_size
from .graphs import BipartiteGraph, spectral_gap
from .layers import X_LAYERS, XLinear, is_conv1d_linear

__all__ = ["LayerRow", "Report", "cached_spectral_gap", "default_input_size", "report"]

_X = X_LAYERS
_COUNTED = (nn.modules.conv._ConvNd, nn.Linear, *X_LAYERS)


def _is_counted(m: nn.Module) -> bool:
    """Counted from its shapes (transformers' Conv1D is a linear stored ``[in, out]``)."""
    return isinstance(m, _COUNTED) or is_conv1d_linear(m)
_DECISION_FIELDS = ("kind", "reason", "in_channels", "out_channels", "kernel", "degree", "blocks", "graph",
                    "spectral_gap", "mixing", "note", "seed")




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

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops_before"], d["flops_after"] = self.flops_before, self.flops_after
        return d


def _fmt_name(name: str) -> str:
    return name or "(model)"


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
            name=name, kind=("linear" if kernel is None else "pointwise" if area == 1 else "conv"), converted=True,
            in_channels=m.in_features, out_channels=m.out_features, kernel=kernel, degree=m.degree,
            blocks=m.blocks, graph=m.graph_name, spectral_gap=cached_spectral_gap(m.graph), mixing=m.mixing,
            params_before=m.out_features * m.in_features * area + bias, params_after=m.weight.numel() + bias,
        )
    params = m.weight.numel() + bias if getattr(m, "weight", None) is not None else 0
    if is_conv1d_linear(m):
        return LayerRow(name=name, kind="linear", in_channels=int(m.weight.shape[0]),
                        out_channels=int(m.weight.shape[1]), params_before=params, params_after=params)
    if isinstance(m, nn.Linear):
        return LayerRow(name=name, kind="linear", in_channels=m.in_features, out_channels=m.out_features,
                        params_before=params, params_after=params)
    return LayerRow(name=name, kind=_conv_kind(m), in_channels=m.in_channels, out_channels=m.out_channels,
                    kernel=list(m.kernel_size), params_before=params, params_after=params)


def _module_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(before, after) MACs of one call of a counted module."""
    if isinstance(m, XLinear):
        return out.numel() * m.in_features, out.numel() * m.degree
    if isinstance(m, _X):
        area = math.prod(m.kernel_size)
        return out.numel() * m.in_channels * area, out.numel() * m.degree * area
    if is_conv1d_linear(m):
        macs = out.numel() * int(m.weight.shape[0])
        return macs, macs
    if isinstance(m, nn.Linear):
        macs = out.numel() * m.in_features
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

    def sdpa(q, k, v, *_, **__):
        # q [..., Lq, E], k [..., Lk, E], v [..., Lk, Ev]: QK^T then (attn)V
        lead = math.prod(q.shape[:-2])
        return lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])

    table: dict[Any, tuple[str, Any]] = {}
    for name, fn, kind in [
        ("mm", mm, "matmul"), ("addmm", addmm, "matmul"), ("bmm", bmm, "matmul"), ("baddbmm", baddbmm, "matmul"),
        ("mv", mv, "matmul"), ("addmv", addmv, "matmul"), ("dot", dot, "matmul"), ("vdot", dot, "matmul"),
        ("convolution", conv, "functional"), ("_convolution", conv, "functional"),
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
        if isinstance(macs, tuple):  # convolution: needs the output shape
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
        if row.calls == 0:
            self.order.append(row)
        row.calls += 1
        row.macs_before += before
        row.macs_after += after

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


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """Per-layer and total params / MACs / FLOPs before and after the surgery.

    ``params_before`` / ``params_after`` are totals over ALL parameters of the model (norms,
    embeddings, ...), X-layers at their dense size before; MAC totals are sums over rows.
    """

    model: str
    input_size: list[int]
    layers: list[LayerRow] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    batch: int = 1
    method: str | None = None  # how the surgery rewrote the model ("fx" / "module-swap"), if it did
    trace_error: str | None = None
    inputs: list[dict[str, Any]] | None = None  # name/shape/dtype per input tensor; None: no forward ran
    macs_known: bool = True  # False when there was no example input: params only, MACs None

    @property
    def totals(self) -> dict[str, Any]:
        """``params/macs/flops_before/after``, their ``*_ratio`` (before / after), ``converted_layers``.

        Without an example input the MAC and FLOP entries are None (never a guessed shape's)."""
        if not self.macs_known:
            return {"params_before": self.params_before, "params_after": self.params_after,
                    "macs_before": None, "macs_after": None, "flops_before": None, "flops_after": None,
                    "params_ratio": _ratio(self.params_before, self.params_after), "macs_ratio": None,
                    "converted_layers": sum(r.converted for r in self.layers)}
        macs_b = sum(r.macs_before for r in self.layers)
        macs_a = sum(r.macs_after for r in self.layers)
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": macs_b,
            "macs_after": macs_a,
            "flops_before": 2 * macs_b,
            "flops_after": 2 * macs_a,
            "params_ratio": _ratio(self.params_before, self.params_after),
            "macs_ratio": _ratio(macs_b, macs_a),
            "converted_layers": sum(r.converted for r in self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the ``--json`` output."""
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "batch": self.batch,
            "inputs": self.inputs,
            **({"method": self.method} if self.method is not None else {}),
            **({"trace_error": self.trace_error} if self.trace_error is not None else {}),
            "totals": self.totals,
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Inverse of :meth:`to_dict` (derived fields are recomputed)."""
        names = set(LayerRow.__dataclass_fields__)
        rows = [LayerRow(**{k: v for k, v in r.items() if k in names}) for r in d["layers"]]
        t = d["totals"]
        return cls(d["model"], list(d["input_size"]), rows, int(t["params_before"]), int(t["params_after"]),
                   int(d.get("batch", 1)), d.get("method"), d.get("trace_error"), d.get("inputs"),
                   t.get("macs_before") is not None)

    def render(self, console=None, max_rows: int | None = None) -> None:
        """Print the layer table and the totals with ``rich``.

        Args:
            console: a ``rich.console.Console`` (default: a new one on stdout).
            max_rows: show at most this many layer rows (first and last halves, the middle
                collapsed into one line); the totals are always shown.
        """
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        title = f"{self.model} @ {'x'.join(str(v) for v in self.input_size) or 'no input'}"
        if self.batch != 1:
            title += f", batch {self.batch}"
        table = Table(title=title, show_lines=False, header_style="bold", pad_edge=False)
        graphs = any(r.degree is not None for r in self.layers)  # D, G, graph, gap only when there are some
        cols = [("layer", {"overflow": "fold"}), ("kind", {}), ("C_in->C_out", {"justify": "right"}), ("kernel", {})]
        if graphs:
            cols += [("D", {"justify": "right"}), ("G", {"justify": "right"}), ("graph", {}),
                     ("gap", {"justify": "right"})]
        cols += [("params", {"justify": "right"}), ("MACs", {"justify": "right"}), ("reason", {})]
        for col, kw in cols:
            table.add_column(col, **kw)
        rows = self.layers
        hidden = 0
        if max_rows is not None and len(rows) > max_rows:
            head = (max_rows + 1) // 2
            tail = max_rows - head
            hidden = len(rows) - head - tail
            rows = rows[:head] + [None] + (rows[-tail:] if tail else [])  # type: ignore[list-item]
        for r in rows:
            if r is None:
                table.add_row(f"... {hidden} more layers", *[""] * (len(cols) - 1), style="dim")
                continue
            chans = f"{r.in_channels}->{r.out_channels}" if r.in_channels is not None else ""
            cells = [_fmt_name(r.name), r.kind, chans, "x".join(map(str, r.kernel)) if r.kernel else ""]
            if graphs:
                cells += [_opt(r.degree), _opt(r.blocks), r.graph or "",
                          "" if r.spectral_gap is None else f"{r.spectral_gap:.3f}"]
            reason = r.reason or r.note or ("not run" if r.calls == 0 and not r.projected else "")
            if r.projected:
                reason = f"{reason} (planned)".strip()
            macs = _before_after(r.macs_before, r.macs_after) if self.macs_known else "-"
            if not self.macs_known and reason == "not run":
                reason = ""
            cells += [_before_after(r.params_before, r.params_after), macs, reason]
            table.add_row(*cells, style="green" if r.converted else None)
        console.print(table)

        t = self.totals
        foot = Table(title="totals", header_style="bold")
        for col in ("", "before", "after", "reduction"):
            foot.add_column(col, justify="right" if col else "left")
        for label, key in (("params", "params"), ("MACs", "macs"), ("FLOPs", "flops")):
            b, a = t[f"{key}_before"], t[f"{key}_after"]
            if b is None:
                foot.add_row(label, "give an example input for MACs", "", "")
                continue
            foot.add_row(label, _human(b), _human(a), f"{_ratio(b, a):.2f}x")
        console.print(foot)
        console.print(f"{t['converted_layers']} of {len(self.layers)} counted layers converted; "
                      "FLOPs = 2 x MACs")


def _ratio(before: int, after: int) -> float:
    return float(before) / after if after else float("inf") if before else 1.0


def _opt(v: Any) -> str:
    return "" if v is None else str(v)


def _human(n: float) -> str:
    """25561896 -> '25.56 M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


def _before_after(b: int, a: int) -> str:
    return _human(b) if a == b else f"{_human(b)} -> {_human(a)}"


def _merge(rows: list[LayerRow], decisions: Iterable[Any], modules: Mapping[str, nn.Module],
           project: bool) -> None:
    by_name = {r.name: r for r in rows if r.kind not in ("matmul", "attention", "functional")}
    for d in decisions:
        if is_dataclass(d) and not isinstance(d, type):
            d = asdict(d)
        elif not isinstance(d, Mapping) and hasattr(d, "to_dict"):
            d = d.to_dict()
        name = d.get("name")
        if name is None:
            continue
        row = by_name.get(name)
        if row is None:  # a decision about a module the forward never reached
            m = modules.get(name)
            if _is_counted(m):
                row = _module_row(name, m)
            else:  # a weight module with no X-layer form (embedding, RNN, attention): its own params
                own = sum(q.numel() for q in m.parameters(recurse=False)) if m is not None else 0
                row = LayerRow(name=name, kind=d.get("kind") or "?", params_before=own, params_after=own)
            rows.append(row)
            by_name[name] = row
        is_x = isinstance(modules.get(name), _X)
        for key in _DECISION_FIELDS:
            value = d.get(key)
            if value is None:
                continue
            if is_x and key in ("in_channels", "out_channels", "kernel", "degree", "blocks", "graph", "mixing"):
                continue  # the module is the truth for what was built
            if not is_x and not (project and d.get("converted")) and key in ("degree", "blocks", "graph",
                                                                              "spectral_gap", "mixing", "seed"):
                continue  # graph details of a layer that is not (or not yet) converted
            setattr(row, key, list(value) if key == "kernel" else value)
        if project and d.get("converted") and not is_x and d.get("degree") and row.in_channels and row.out_channels:
            # dry run: the layer as the plan would build it
            area = math.prod(row.kernel) if row.kernel else 1
            bias = row.params_before - row.in_channels * row.out_channels * area if row.in_channels else 0
            row.params_after = row.out_channels * int(d["degree"]) * area + bias
            row.macs_after = row.macs_before * int(d["degree"]) // row.in_channels
            row.converted = row.projected = True


def report(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    name: str | None = None,
    decisions: Iterable[Any] | None = None,
    batch: int = 1,
    project: bool = False,
    example_inputs: Any = None,
) -> Report:
    """Count params and MACs of ``model`` with one forward pass on an example input.

    Args:
        model: any ``nn.Module``; may contain X-layers.
        input_size: per-sample shape of one float input, e.g. ``(3, 224, 224)``; default the
            model family's example (:func:`xsurgery._inputs.default_example`). A model of no
            known family and no example gets a report of parameters only (MACs None).
        name: the model's name in the report (default: its timm architecture or class name).
        decisions: the surgery's per-layer decisions (dicts keyed by ``name``); their
            ``reason`` (stem, classifier, depthwise, ...) and graph details go into the rows.
        batch: batch size of the counting pass (MACs scale with it).
        project: for a decision that says ``converted`` on a still-dense layer, report the
            layer as the plan would build it (``xsurgery plan``); the totals then describe the
            planned model, not ``model``.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
            (real dtypes); replaces ``input_size`` and ``batch``.

    Returns:
        The :class:`Report`; ``report.params_after == sum(p.numel() for p in model.parameters())``
        unless ``project`` changed planned layers.
    """
    global _ATEN
    if _ATEN is None:
        _ATEN = _aten_macs()
    from ._inputs import call, default_example, describe, normalize, per_sample_size

    if example_inputs is not None:
        example = normalize(example_inputs)
        from ._inputs import batch_of

        batch = batch_of(example)
    elif input_size is not None:
        p = next(iter(model.parameters()), None)
        x = torch.randn(batch, *input_size, device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None and p.is_floating_point() else None)
        example = ((x,), {})
    else:
        example = default_example(model, batch)
    size = per_sample_size(example)
    if name is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        name = name or type(model).__name__
    tracker = _Tracker(model)
    modes = [(m, m.training) for m in model.modules()]  # per module: a frozen BN stays in eval
    # nn.MultiheadAttention's fused fast path is one opaque aten op; the regular path is countable
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # likewise an RNN on oneDNN (CPU) is one opaque op; without oneDNN it runs as counted matmuls
    onednn = torch.backends.mkldnn.enabled
    rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        if rnn:
            torch.backends.mkldnn.enabled = False
        if example is not None:
            with torch.no_grad(), _FunctionalCounter(tracker):
                try:
                    call(model, example)
                except Exception as exc:
                    from ._errors import UserError
                    from ._inputs import first_error_line, shapes_text

                    raise UserError(f"the model does not run on the example input ({shapes_text(example)}): "
                                    f"{first_error_line(exc)}; give an input it takes (--input / example_inputs)") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.mkldnn.enabled = onednn
        tracker.remove()
        for m, training in modes:
            m.training = training

    rows = tracker.all_rows()
    modules = dict(model.named_modules())
    if decisions is not None:
        _merge(rows, decisions, modules, project)

    params_after = sum(q.numel() for q in model.parameters())
    extra = sum(r.params_before - r.params_after for r in tracker.module_rows.values() if r.converted
                and not r.projected)
    params_before = params_after + extra
    params_after -= sum(r.params_before - r.params_after for r in rows if r.projected)
    return Report(model=name, input_size=size, layers=rows, params_before=params_before,
                  params_after=params_after, batch=batch, inputs=describe(model, example),
                  macs_known=example is not None)
