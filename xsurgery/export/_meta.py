"""The ``xsurgery.*`` metadata written into an exported file, and reading it back."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from .._version import __version__

_META = "xsurgery."


def _compression(model: nn.Module, layers) -> str:
    spec = getattr(model, "_xsurgery_spec", None)  # xsurgery.load re-applies the surgery, so loaded models carry it too
    if isinstance(spec, dict):
        if spec.get("compress") is not None:
            return f"{float(spec['compress']):g}"
        if spec.get("degree") is not None:
            return f"degree={spec['degree']}"
    compact = sum(m.weight.numel() for _, m in layers)
    dense = sum(m.weight.numel() // m.degree * m.in_features for _, m in layers)
    return f"{dense / compact:.4g}" if compact else "1"


def _source(model: nn.Module) -> str:
    src = getattr(model, "_xsurgery_source", None)  # xsurgery.load re-applies the surgery, so loaded models carry it too
    if isinstance(src, dict) and src.get("source"):
        kw = src.get("model_kwargs") or {}
        return src["source"] + (f" {json.dumps(kw, sort_keys=True)}" if kw else "")
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _metadata(model, layers, choices, layout, shape, dynamic, opset, inputs=None,
              runtime: str = "onnxruntime") -> dict[str, str]:
    rows = []
    for name, m in layers:
        rows.append({"name": name, "type": type(m).__name__, "layout": choices[name], "graph_hash": m.graph.hash(),
                     "graph": m.graph_name, "degree": m.degree, "blocks": m.blocks,
                     "in": m.in_features, "out": m.out_features, "identity_index": bool(m._identity)})
    meta = {
        "version": __version__,
        "source_model": _source(model),
        "compression": _compression(model, layers),
        "layout": layout,
        "layers": json.dumps(rows, separators=(",", ":")),
        "input_shape": json.dumps(["batch" if dynamic else shape[0], *shape[1:]]),
        "opset": str(opset),
        "runtime": runtime,  # the runtime auto tuned the layout for
    }
    if inputs is not None:
        meta["inputs"] = json.dumps(inputs, separators=(",", ":"))
    spec = getattr(model, "_xsurgery_spec", None)
    if spec is not None:
        meta["surgery"] = json.dumps(spec, sort_keys=True)
    return {_META + k: v for k, v in meta.items()}


def read_metadata(path: str) -> dict[str, Any]:
    """The ``xsurgery.*`` metadata of an exported file (``layers`` decoded from JSON)."""
    import onnx

    props = {p.key[len(_META):]: p.value for p in onnx.load(path, load_external_data=False).metadata_props
             if p.key.startswith(_META)}
    for k in ("layers", "input_shape", "surgery", "inputs"):
        if k in props:
            props[k] = json.loads(props[k])
    return props
