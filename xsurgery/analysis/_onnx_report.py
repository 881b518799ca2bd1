"""The report of an exported ONNX file (``xsurgery report model.onnx``), from its graph alone.

The file is data: it is parsed with ``onnx`` (protobuf, no code runs) and its ``xsurgery.*``
metadata only names layers and their graph shape. MACs come from the graph itself: shapes are
inferred at batch 1 (a dynamic batch axis set to 1), every ``Conv``/``ConvTranspose``/``Gemm``/
``MatMul`` node is counted and attributed to the module its name scope points at
(``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``). An X-layer's nodes give its executed
MACs under the layout export chose (gather: Gather + grouped Conv, the sparse MACs; dense: a
dense Conv on a zero-filled weight, the dense MACs); its sparse and dense MACs follow from the
degree in the metadata.

A quantized file (``xsurgery export --quantize int8``: QDQ) holds its weights as int8
initializers read through ``DequantizeLinear``: they are followed back to the initializer
(its shape, its parameters; scales and zero points are not parameters), and a counted node
whose input and weight both come out of 8-bit ``DequantizeLinear`` nodes is labelled ``int8``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from .._util.text import safe_text
from ..errors import UserError

__all__ = ["onnx_layer_of", "onnx_report"]

_META = "xsurgery."
_COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _scope_name(node_name: str) -> str:
    """``/layer2/layer2.0/downsample/downsample.0/Conv`` -> ``layer2.0.downsample.0``: a segment
    ``parent.child`` after the segment ``parent`` (a called container) adds ``child``; without it
    (a ModuleList iterated, not called: HF's ``/encoder/layer.0/...``) it adds ``parent.child``."""
    segments = [s for s in node_name.split("/")[1:-1] if s]
    out: list[str] = []
    for i, seg in enumerate(segments):
        head, _, tail = seg.rpartition(".")
        out.append(tail if head and i and segments[i - 1].endswith(head) and head.rsplit(".", 1)[-1] ==
                   segments[i - 1].rsplit(".", 1)[-1] else seg)
    return ".".join(out)


def onnx_layer_of(node_name: str, layers) -> str | None:
    """The layer of ``layers`` (names) an exported node belongs to, from the node's name scope;
    a model exported through its inputs' wrapper (keyword or nested inputs) has its scopes
    under ``model``."""
    return _owner(_scope_name(node_name), layers)


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


def _shapes(model, input_shape: list[Any] | None = None) -> dict[str, list[int]]:
    """Every tensor's static shape after inference at batch 1 (the other dynamic axes at the
    export example's size, from ``input_shape`` of the first input, else 1). Where ONNX's own
    inference leaves a counted node's input unknown (shape arithmetic before a Reshape, as in
    Hugging Face models), ONNX Runtime's symbolic inference (pure Python on the graph) is used."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    sizes: dict[str, int] = {}
    if m.graph.input and input_shape:
        for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, input_shape):
            if d.dim_param and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_META_DIM:
                sizes[d.dim_param] = v
    for vi in m.graph.input:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.dim_value = 1 if i == 0 else sizes.get(d.dim_param, 1)
    try:
        inferred = shape_inference.infer_shapes(m)
    except Exception as exc:
        raise UserError(f"the ONNX graph's shapes could not be inferred ({exc}); was it exported by xsurgery?") from None
    shapes = _static(inferred)
    if any(n.input and n.input[0] not in shapes for n in m.graph.node if n.op_type in _COUNTED_OPS):
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            shapes = {**_static(SymbolicShapeInference.infer_shapes(m, auto_merge=True)), **shapes}
        except Exception:  # noqa: BLE001 - not installed, or it cannot either: those nodes stay uncounted
            pass
    return shapes


def _static(m) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def _node_macs(node, shapes: dict[str, list[int]], weight: str) -> tuple[int, list[int] | None] | None:
    """MACs of one counted node and its weight's shape (None where shapes are unknown);
    ``weight``: the initializer its second input reads (through Identity/DequantizeLinear)."""
    weight = weight if weight in shapes else node.input[1] if len(node.input) > 1 else weight
    if len(node.input) < 2 or node.input[0] not in shapes or weight not in shapes:
        return None
    x, w = shapes[node.input[0]], shapes[weight]
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
    shapes = _shapes(model, input_shape)
    inits = {t.name: t for t in model.graph.initializer}
    rows: dict[str, LayerRow] = {}
    order: list[LayerRow] = []
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    qdq = _Quantized(model, inits, alias)
    params = qdq.params
    stored: dict[str, set[str]] = {}  # X-layer -> weight initializers its nodes read (weight, bias)
    for node in model.graph.node:
        scope = _scope_name(node.name)
        owner = _owner(scope, xlayers)
        if owner is not None:
            stored.setdefault(owner, set()).update(i for i in map(qdq.source, node.input) if i in params)
        if node.op_type not in _COUNTED_OPS:
            continue
        weight = qdq.source(node.input[1]) if len(node.input) > 1 else ""
        counted = _node_macs(node, shapes, weight)
        if counted is None:
            continue
        macs, w = counted
        key = owner or f"{scope}#{node.op_type}"
        row = rows.get(key)
        if row is None:
            kind = _kind(node.op_type, w) if weight in inits or owner else "matmul"
            row = rows[key] = LayerRow(name=owner or scope, kind=kind, kernel=list(w[2:]) if w and len(w) > 2 else None,
                                       precision=qdq.precision(node))
            if owner is None and w is not None and weight in inits:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                if node.op_type.startswith("Conv") or trans_b:  # [out, in/groups, k...] / Gemm's [out, in]
                    row.in_channels, row.out_channels = w[1] * _groups(node), w[0]
                else:  # MatMul / Gemm: [in, out]
                    row.in_channels, row.out_channels = w[0], w[-1]
                bias = inits.get(qdq.source(node.input[2])) if len(node.input) > 2 else None
                row.params_before = row.params_after = math.prod(w) + (math.prod(bias.dims) if bias else 0)
            order.append(row)
        row.calls += 1
        row.macs_before += macs
        row.macs_after += macs
    params_after = sum(math.prod(inits[n].dims) for n in params)
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
        row.spectral_gap = _gap(inits.get(f"{name}.index"), d, inits.get(f"{name}.perm"))
        # the file stores a dense layout's weight zero-filled: count what the layer is
        params_after -= row.params_before - row.params_after if dense else 0
        extra += row.params_before - row.params_after
    batch_free = [v for v in input_shape[1:] if isinstance(v, int)]
    rep = Report(model=safe_text(meta.get("source_model") or os.path.basename(path), 200), input_size=batch_free,
                 layers=order, params_before=params_after + extra, params_after=params_after)
    rep.method = f"onnx {safe_text(meta.get('layout', '?'), 40)} layout" if meta else "onnx (no xsurgery metadata)"
    if qdq.dq:
        n8 = sum(r.precision == "int8" for r in order)
        rep.method += f", quantized (QDQ): {n8} of {len(order)} counted layers int8"
    return rep


def _owner(scope: str, xlayers) -> str | None:
    """The X-layer a node's scope lies in (``scope`` itself or a dotted prefix of it, also without
    the ``model.`` of export's input wrapper): one look-up per scope level, linear in the nodes."""
    if not xlayers or not scope:
        return None
    parts = scope.split(".")
    for start in (0, 1) if parts[0] == "model" else (0,):
        for i in range(start + 1, len(parts) + 1):
            name = ".".join(parts[start:i])
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
# the quantized element types DequantizeLinear reads, by how the report labels them
_QUANT_TYPES = {2: "int8", 3: "int8", 4: "int16", 5: "int16", 6: "int32", 21: "int4", 22: "int4"}


class _Quantized:
    """What a QDQ file's ``DequantizeLinear`` nodes say: which initializer a tensor is read from,
    which initializers are parameters, and the precision of a counted node's inputs."""

    def __init__(self, model, inits: dict[str, Any], alias: dict[str, str]):
        self.inits, self.alias = inits, alias
        self.dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        qparams = {i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   for i in n.input[1:]}
        src = {o: self.alias.get(n.input[0], n.input[0]) for o, n in self.dq.items()}
        self.from_dq = {o: i for o, i in src.items() if i in inits}
        # parameters: float initializers (not scales or zero points) and the quantized ones DequantizeLinear reads
        self.params = {n for n, t in inits.items() if t.data_type in _FLOAT_TYPES and n not in qparams}
        self.params |= set(self.from_dq.values())

    def source(self, name: str) -> str:
        """The initializer ``name`` is read from through Identity / DequantizeLinear (else ``name``)."""
        name = self.alias.get(name, name)
        return self.alias.get(self.from_dq.get(name, name), self.from_dq.get(name, name))

    def _type(self, name: str) -> str | None:
        node = self.dq.get(name)
        if node is None:
            return None
        for i in (node.input[0], *node.input[2:3]):  # the quantized tensor's type, or its zero point's
            t = self.inits.get(self.alias.get(i, i))
            if t is not None:
                return _QUANT_TYPES.get(t.data_type)
        return "int8"  # a zero point left out: uint8 by the ONNX default

    def precision(self, node) -> str | None:
        """``int8`` (or int16/int4) when the node's input and weight both come out of DequantizeLinear."""
        if len(node.input) < 2:
            return None
        types = {self._type(node.input[0]), self._type(node.input[1])}
        return next(iter(types)) if len(types) == 1 and None not in types else None


def _groups(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _gap(index, d: dict[str, Any], perm=None) -> float | None:
    """The spectral gap from the file's Gather index ([G*D] or [G, D]), when it has one; a paired
    layer's export gathers only the permuted half (``perm``, [C_in]): its rows are then
    ``[own contiguous chunk g, perm chunk g]``."""
    if index is None and perm is None:
        return None
    from onnx import numpy_helper

    from ..graphs import BipartiteGraph
    from ._report import cached_spectral_gap

    try:
        import torch

        blocks, degree = int(d["blocks"]), int(d["degree"])
        if index is not None:
            flat = numpy_helper.to_array(index).astype("int64").reshape(-1)
        else:  # [own chunk g, perm chunk g] per block
            p = numpy_helper.to_array(perm).astype("int64").reshape(-1, max(1, degree // 2))
            flat = np.concatenate([np.arange(p.size, dtype=np.int64).reshape(p.shape), p], axis=1).reshape(-1)
        if blocks < 1 or degree < 1 or flat.size != blocks * degree:
            return None
        idx = torch.as_tensor(flat).reshape(blocks, degree)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= int(d["in"])):
            return None  # out-of-range or negative indices: no graph to measure
        rows = idx.sort(dim=1).values
        if degree > 1 and bool((rows[:, 1:] == rows[:, :-1]).any()):
            return None  # an input repeated within a block: not a graph xsurgery builds
        g = BipartiteGraph(int(d["in"]), int(d["out"]), degree, blocks, idx, str(d.get("graph")), None)
        return cached_spectral_gap(g)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError):
        return None
