"""The params / MACs / FLOPs report of a (possibly converted) model.

One forward pass on a random input counts, per layer, parameters and multiply-accumulates
(MACs; FLOPs = 2 x MACs), before and after the surgery:

* modules: ``nn.Conv*`` / ``nn.Linear`` from their shapes, X-layers from their degree
  (before = the dense layer they replace);
* everything else that multiplies matrices (``q @ k.T``, ``bmm``, ``einsum``,
  ``F.scaled_dot_product_attention``, ``F.linear`` outside a module, ...) at the aten level,
  attributed to the innermost module running; those rows are never converted.

Ops run inside a counted module are not counted again, so an X-layer's masked execution
(a dense conv on a mostly-zero weight) still counts its sparse MACs; what it computes is in
``macs_executed`` (masked: the dense MACs; gather: the sparse ones), next to the ``execution``
that ``execution="auto"`` resolves to on the layer's device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
from torch import nn

from ..layers import auto_execution
from ..models import default_input_size
from . import _count
from ._count import _X, LayerRow, _FunctionalCounter, _is_counted, _module_row, _Tracker, cached_spectral_gap

__all__ = ["LayerRow", "Report", "cached_spectral_gap", "default_input_size", "report"]

_DECISION_FIELDS = ("kind", "reason", "in_channels", "out_channels", "kernel", "degree", "blocks", "graph",
                    "spectral_gap", "mixing", "note", "seed")


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
    # init="project" only: {"batches", "ridge", "data", "layers": [{name, rows, keep_error, project_error}]}
    projection: dict[str, Any] | None = None

    @property
    def totals(self) -> dict[str, Any]:
        """``params/macs/flops_before/after``, their ``*_ratio`` (before / after), ``converted_layers``,
        and ``macs/flops_executed`` (what the X-layers' executions compute: masked runs dense MACs).

        Without an example input the MAC and FLOP entries are None (never a guessed shape's)."""
        if not self.macs_known:
            return {"params_before": self.params_before, "params_after": self.params_after,
                    "macs_before": None, "macs_after": None, "macs_executed": None, "flops_before": None,
                    "flops_after": None, "flops_executed": None,
                    "params_ratio": _ratio(self.params_before, self.params_after), "macs_ratio": None,
                    "converted_layers": sum(r.converted for r in self.layers)}
        macs_b = sum(r.macs_before for r in self.layers)
        macs_a = sum(r.macs_after for r in self.layers)
        macs_x = sum(r.executed_macs for r in self.layers)
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": macs_b,
            "macs_after": macs_a,
            "macs_executed": macs_x,
            "flops_before": 2 * macs_b,
            "flops_after": 2 * macs_a,
            "flops_executed": 2 * macs_x,
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
            **({"projection": self.projection} if self.projection is not None else {}),
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
                   t.get("macs_before") is not None, d.get("projection"))

    def render(self, console=None, max_rows: int | None = None, *, show_all: bool = False,
               width: int | None = None, fmt: str = "table") -> None:
        """Print the layer table and the totals (see :func:`xsurgery.analysis._render.render_report`).

        Args:
            console: a ``rich.console.Console`` (default: a new one on stdout).
            max_rows: collapse repeated identical layers past this many rows (default 40);
                given explicitly, also cut the middle of what is still longer.
            show_all: every layer on its own row.
            width: the width to fit (default the console's; ``0``: every column).
            fmt: ``table``, ``markdown``, ``csv`` or ``json``.
        """
        from ._render import render_report

        render_report(self, console=console, max_rows=max_rows, show_all=show_all, width=width, fmt=fmt)


def _ratio(before: int, after: int) -> float:
    return float(before) / after if after else float("inf") if before else 1.0


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
                if row.kind in ("experts", "other"):  # run as functional matmuls (MoE experts, routers): their MACs
                    for r in [r for r in rows if r.name == name and r.kind == "matmul"]:
                        row.calls, row.macs_before, row.macs_after = r.calls, r.macs_before, r.macs_after
                        rows.remove(r)
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
            if key == "note" and row.note and row.note != value:  # the count's own note stays beside the surgery's
                value = f"{value}; {row.note}"
            setattr(row, key, list(value) if key == "kernel" else value)
        if project and d.get("converted") and not is_x and d.get("degree") and row.in_channels and row.out_channels:
            # dry run: the layer as the plan would build it
            area = math.prod(row.kernel) if row.kernel else 1
            bias = row.params_before - row.in_channels * row.out_channels * area if row.in_channels else 0
            row.params_after = row.out_channels * int(d["degree"]) * area + bias
            row.macs_after = row.macs_before * int(d["degree"]) // row.in_channels
            row.converted = row.projected = True
            if d.get("blocks"):  # as execution="auto" would run the planned layer on CPU
                kind = "linear" if row.kind == "linear" else "pointwise" if area == 1 else "conv"
                row.execution = auto_execution(int(d["blocks"]), row.out_channels, int(d["degree"]),
                                               row.in_channels, None, kind)
                row.macs_executed = row.macs_before if row.execution == "masked" else row.macs_after


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
            model family's example (:func:`xsurgery.models.inputs.default_example`). A model of no
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
    if _count._ATEN is None:
        _count._ATEN = _count._aten_macs()
    from ..models import call, default_example, describe, normalize, per_sample_size

    if example_inputs is not None:
        example = normalize(example_inputs)
        from ..models import batch_of

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
                    from ..errors import UserError
                    from ..models import first_error_line, shapes_text

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
