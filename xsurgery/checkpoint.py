"""Checkpoints: one safetensors file with a JSON manifest in its metadata (no pickle).

The manifest records how to rebuild the model (source, kwargs, surgery spec) and each
X-layer's graph (degree, blocks, construction, seed, index hash); :func:`load` rebuilds
the source model, re-applies the surgery, loads the weights (index buffers included) and
checks every graph hash against the manifest.

A checkpoint is data: its manifest is bounded and schema-checked, its model source must be
a registered library name (an import path needs the caller's consent), every tensor is
checked against the manifest's sha256 digest and for NaN/inf, all before anything is built
(see :mod:`xsurgery._manifest`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from . import _manifest
from ._errors import UserError
from ._io import write_atomic, write_safetensors
from ._version import __version__
from .layers import XConv2d, XLinear

__all__ = ["FORMAT", "load", "read_manifest", "save", "write_atomic"]

FORMAT = "xsurgery-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "xsurgery"


def _versions() -> dict[str, str]:
    import torchvision

    out = {"xsurgery": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def manifest_of(model: nn.Module) -> dict[str, Any]:
    """The manifest :func:`save` writes for ``model``."""
    source = getattr(model, "_xsurgery_source", None)
    if source is None:
        raise UserError(
            "this model does not record where it came from; build it with xsurgery.convert('<name>') "
            "or xsurgery._sources.create_model('<name>') so that it can be saved and rebuilt"
        )
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (XConv2d, XLinear)):
            g = m.graph
            layers.append({"name": name, "degree": g.degree, "blocks": g.blocks, "graph": g.construction,
                           "seed": g.seed, "index_hash": g.hash()})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "surgery": getattr(model, "_xsurgery_spec", None),
        "input_size": getattr(model, "_xsurgery_input_size", None),
        "layers": layers,
        "versions": _versions(),
    }


def save(model: nn.Module, path: str, *, force: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``path`` (safetensors weights + manifest); returns the manifest.

    Args:
        model: a model made by :func:`xsurgery.convert` or ``create_model``.
        path: output file (``.xs`` by convention).
        force: overwrite an existing file.
        extra: JSON-able fields added to the manifest under ``"extra"``.
    """
    manifest = manifest_of(model)
    if extra:
        manifest["extra"] = extra
    # clones: tied weights share storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    manifest["weights"] = _manifest.weights_digest(tensors)
    meta = {_META_KEY: json.dumps(manifest, sort_keys=True)}
    write_safetensors(path, tensors, metadata=meta, force=force)
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a checkpoint, validated; :class:`UserError` for anything unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    manifest, _table = _manifest.read_bounded(path, _META_KEY)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported checkpoint format {str(manifest.get('format'))[:40]} "
                        f"v{str(manifest.get('format_version'))[:10]}")
    _manifest.validate(manifest, path)
    return manifest


def load(path: str, *, map_location: str = "cpu", trust_source: bool = False,
         allow_nonfinite: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (no pickle).

    Nothing the file names is imported or called unless it is a registered library model
    (torchvision, timm, the zoo, ``hf/...``) taking the recorded JSON kwargs.

    Args:
        path: the checkpoint.
        map_location: device of the loaded tensors.
        trust_source: let a manifest whose source is an import path ``pkg.mod:factory``
            import and call it (only for files you trust as you would a script).
        allow_nonfinite: accept NaN/inf weights.

    Raises:
        UserError: unreadable, truncated or altered file (a tensor not matching its digest
            is named), an untrusted source, non-finite weights, or index buffers that do not
            match the manifest.
    """
    from safetensors.torch import load_file

    from ._sources import create_model
    from .surgery import SurgerySpec, apply_surgery

    manifest = read_manifest(path)
    src = manifest["source"]
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors checkpoint ({str(exc).splitlines()[0][:100]})") from exc
    _manifest.verify_weights(manifest, tensors, path, allow_nonfinite=allow_nonfinite)
    _manifest.check_source(src, path, trust_source=trust_source)
    model = create_model(src["source"], src.get("model_kwargs") or {}, pretrained=False)
    if manifest.get("surgery") is not None:
        try:
            spec = SurgerySpec.from_dict(manifest["surgery"])
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: its manifest's surgery is invalid ({str(exc).splitlines()[0][:160]})") from exc
        model, _, _ = apply_surgery(model, spec)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise UserError(f"{path}: weights do not match the model its manifest describes ({' '.join(first)[:160]})") from exc
    recorded = {d["name"]: d["index_hash"] for d in manifest.get("layers", [])}
    found = {n: m.graph.hash() for n, m in model.named_modules() if isinstance(m, (XConv2d, XLinear))}
    if recorded != found:
        bad = sorted(n for n in set(recorded) | set(found) if recorded.get(n) != found.get(n))
        raise UserError(f"{path}: graphs of {', '.join(bad[:3])} do not match the manifest; the file was altered or is corrupt")
    model._xsurgery_manifest = manifest
    if manifest.get("input_size"):
        model._xsurgery_input_size = manifest["input_size"]
    return model
