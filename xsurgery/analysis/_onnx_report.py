"""The report of an exported ONNX file (``xsurgery report model.onnx``), from its graph alone.

The file is data: it is parsed with ``onnx`` (protobuf, no code runs) and its ``xsurgery.*``
metadata only names layers and their graph shape. MACs come from the graph itself: shapes are
inferred at batch 1 (a dynamic batch axis set to 1), every ``Conv``/``ConvTranspose``/``Gemm``/
``MatMul`` node is counted and attributed to the module its name scope points at
(``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``). An X-layer's nodes give its executed
MACs under the layout export chose (gather: Gather + grouped Conv, the sparse MACs; dense: a
dense Conv on a zero-filled weight, the dense MACs); its sparse and dense MACs follow from the
degree in the metadata.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .._util.text import safe_text
from ..errors import UserError

__all__ = ["onnx_report"]

_META = "xsurgery."
_COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _scope_name(node_name: str) -> str:
    """``/layer2/layer2.0/downsample/downsample.0/Conv`` -> ``layer2.0.downsample.0``: each scope
    segment is ``parent.child`` for container children, so its last dotted part is the child's name."""
    segments = [s for s in node_name.split("/")[1:-1] if s]
    return ".".join(s.rsplit(".", 1)[-1] for s in segments)


def _load(path: str):
    try:
        import onnx
    except ImportError:
        raise UserError("reading .onnx files needs onnx: pip install 'xsurgery[onnx]'") from None
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's errors name no fix; the file is simply not ONNX
        raise UserError(f"{path} is not a readable ONNX file ({type(exc).__name__}); give an exported .onnx") from None


def _shapes(model) -> dict[str, list[int]]:
    """Every tensor's static shape after inference at batch 1 (dynamic axes set to 1)."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    try:
        m = shape_inference.infer_shapes(m)
    except Exception as exc:
        raise UserError(f"the ONNX graph's shapes could not be inferred ({exc}); was it exported by xsurgery?") from None
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _node_macs(node, shapes: dict[str, list[int]]) -> tuple[int, list[int] | None] | None:
    """MACs of one counted node and its weight's shape (None where shapes are unknown)."""
    if len(node.input) < 2 or node.input[0] not in shapes or node.input[1] not in shapes:
        return None
    x, w = shapes[node.input[0]], shapes[node.input[1]]
    out = shapes.get(node.output[0])
    if node.op_type == "Conv" and out is not None:
        return math.prod(out) * math.prod(w[1:]), w
    if node.op_type == "ConvTranspose":
        return math.prod(x) * math.prod(w[1:]), w
    if node.op_type in ("Gemm", "MatMul") and out is not None:
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        k = x[-2] if trans_a and len(x) >= 2 else x[-1]
        return math.prod(out) * k, w
    return None


def _kind(op: str, w: list[int] | None) -> str:
    if op in ("Gemm", "MatMul") or not w:
        return "linear"
    return "pointwise" if all(k == 1 for k in w[2:]) else "conv"


def onnx_report(path: str):
    """A :class:`~xsurgery.analysis.Report` of an exported file: per layer the layout export chose
    (``execution``: gather, or masked for the dense layout), executed and sparse MACs at batch 1."""
    from ._report import LayerRow, Report

    model = _load(path)
    meta = {p.key[len(_META):]: p.value for p in model.metadata_props if p.key.startswith(_META)}
    xlayers, input_shape = _metadata(path, meta)
    shapes = _shapes(model)
    inits = {t.name: t for t in model.graph.initializer}
    rows: dict[str, LayerRow] = {}
    order: list[LayerRow] = []
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    stored: dict[str, set[str]] = {}  # X-layer -> float initializers its nodes read (weight, bias)
    for node in model.graph.node:
        scope = _scope_name(node.name)
        owner = _owner(scope, xlayers)
        if owner is not None:
            names = (alias.get(i, i) for i in node.input)
            stored.setdefault(owner, set()).update(i for i in names if i in inits and
                                                   inits[i].data_type in _FLOAT_TYPES)
        if node.op_type not in _COUNTED_OPS:
            continue
        counted = _node_macs(node, shapes)
        if counted is None:
            continue
        macs, w = counted
        key = owner or f"{scope}#{node.op_type}"
        row = rows.get(key)
        if row is None:
            kind = _kind(node.op_type, w) if alias.get(node.input[1], node.input[1]) in inits or owner else "matmul"
            row = rows[key] = LayerRow(name=owner or scope, kind=kind, kernel=list(w[2:]) if w and len(w) > 2 else None)
            if owner is None and w is not None and alias.get(node.input[1], node.input[1]) in inits:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                if node.op_type.startswith("Conv") or trans_b:  # [out, in/groups, k...] / Gemm's [out, in]
                    row.in_channels, row.out_channels = w[1] * _groups(node), w[0]
                else:  # MatMul / Gemm: [in, out]
                    row.in_channels, row.out_channels = w[0], w[-1]
                bias = inits.get(node.input[2]) if len(node.input) > 2 else None
                row.params_before = row.params_after = math.prod(w) + (math.prod(bias.dims) if bias else 0)
            order.append(row)
        row.calls += 1
        row.macs_before += macs
        row.macs_after += macs
    params_after = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)
    extra = 0
    for name, d in xlayers.items():
        row = rows.get(name)
        if row is None:  # the layer never ran on the example at export
            row = rows[name] = LayerRow(name=name, kind="conv")
            order.append(row)
        degree, cin, cout = d.get("degree", 0), d.get("in", 0), d.get("out", 0)
        area = math.prod(row.kernel) if row.kernel else 1
        dense = d.get("layout") == "dense"
        executed = row.macs_before
        row.converted = True
        row.in_channels, row.out_channels, row.degree = cin, cout, degree
        row.blocks, row.graph = d.get("blocks"), d.get("graph")
        row.execution = "masked" if dense else "gather"
        row.macs_executed = executed
        row.macs_before = executed if dense else executed * cin // max(degree, 1)
        row.macs_after = executed * degree // max(cin, 1) if dense else executed
        weights = sum(math.prod(inits[i].dims) for i in stored.get(name, ()))
        bias = max(0, weights - cout * (cin if dense else degree) * area)
        row.params_before = cout * cin * area + bias
        row.params_after = cout * degree * area + bias
        row.spectral_gap = _gap(inits.get(f"{name}.index"), d)
        # the file stores a dense layout's weight zero-filled: count what the layer is
        params_after -= row.params_before - row.params_after if dense else 0
        extra += row.params_before - row.params_after
    batch_free = [v for v in input_shape[1:] if isinstance(v, int)]
    rep = Report(model=safe_text(meta.get("source_model") or os.path.basename(path), 200), input_size=batch_free,
                 layers=order, params_before=params_after + extra, params_after=params_after)
    rep.method = f"onnx {safe_text(meta.get('layout', '?'), 40)} layout" if meta else "onnx (no xsurgery metadata)"
    return rep


def _owner(scope: str, xlayers: dict[str, Any]) -> str | None:
    """The X-layer a node's scope lies in (``scope`` itself or a dotted prefix of it): one
    dictionary look-up per scope level, so the report is linear in the node count."""
    if not xlayers or not scope:
        return None
    parts = scope.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in xlayers:
            return name
    return None


_INT_KEYS = ("degree", "in", "out", "blocks")
MAX_META_DIM = 1 << 31


def _metadata(path: str, meta: dict[str, str]) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """The ``xsurgery.layers`` and ``xsurgery.input_shape`` metadata, type-checked: a file
    whose metadata has the wrong types gets one line, not a traceback."""
    bad = UserError(f"{path}: its xsurgery metadata is not what xsurgery export writes; re-export the model")
    try:
        layers = json.loads(meta.get("layers", "[]"))
        input_shape = json.loads(meta.get("input_shape", "[]"))
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(layers, list) or not isinstance(input_shape, list):
        raise bad
    xlayers: dict[str, dict[str, Any]] = {}
    for d in layers:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise bad
        for key in _INT_KEYS:
            v = d.get(key, 0 if key != "blocks" else None)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_META_DIM):
                raise bad
        if not all(d.get(k) is None or isinstance(d[k], str) for k in ("graph", "layout")):
            raise bad
        xlayers[d["name"]] = d
    return xlayers, input_shape


_FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights, not indices


def _groups(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _gap(index, d: dict[str, Any]) -> float | None:
    """The spectral gap from the file's Gather index ([G*D] or [G, D]), when it has one."""
    if index is None:
        return None
    from onnx import numpy_helper

    from ..graphs import BipartiteGraph
    from ._report import cached_spectral_gap

    try:
        import torch

        blocks, degree = int(d["blocks"]), int(d["degree"])
        if blocks < 1 or degree < 1 or math.prod(index.dims) != blocks * degree:
            return None
        idx = torch.as_tensor(numpy_helper.to_array(index).astype("int64")).reshape(blocks, degree)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= int(d["in"])):
            return None  # out-of-range or negative indices: no graph to measure
        rows = idx.sort(dim=1).values
        if degree > 1 and bool((rows[:, 1:] == rows[:, :-1]).any()):
            return None  # an input repeated within a block: not a graph xsurgery builds
        g = BipartiteGraph(int(d["in"]), int(d["out"]), degree, blocks, idx, str(d.get("graph")), None)
        return cached_spectral_gap(g)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError):
        return None
