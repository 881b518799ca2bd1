"""Checkpoints: one safetensors file with a JSON manifest in its metadata (no pickle).

The manifest records where the model came from (a library name with its kwargs, or, for a
model converted from an ``nn.Module`` object, ``"object"`` and its class for information
only), the surgery spec and each X-layer's graph (degree, blocks, construction, seed, index
hash). :func:`load` takes the dense model from the caller (``model=``) or rebuilds it from a
library name, re-applies the surgery, loads the weights (index buffers included) and checks
every graph hash against the manifest. Nothing read from the file chooses what is imported.

:func:`resolve_model` is the one place that decides "checkpoint path or model name".

A checkpoint is data: its manifest is bounded and schema-checked, its model source must be
a registered library name (an import path needs the caller's consent), every tensor is
checked against the manifest's sha256 digest and for NaN/inf, all before anything is built
(see :mod:`xsurgery.checkpoint._manifest`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .._util.copying import uncompiled
from .._util.io import write_atomic, write_safetensors
from .._util.text import safe_text
from .._version import __version__
from ..errors import UserError
from ..layers import X_LAYERS
from . import _manifest

__all__ = ["FORMAT", "is_checkpoint_path", "load", "load_dense", "read_manifest", "resolve_model", "save", "write_atomic"]

CHECKPOINT_SUFFIXES = (".xs", ".safetensors")


def is_checkpoint_path(source: str) -> bool:
    """A string names a checkpoint when it ends like one or is an existing file."""
    return isinstance(source, str) and (source.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(source))


def source_of(model: nn.Module) -> dict[str, Any]:
    """Where ``model`` came from: what :func:`xsurgery.models.sources.create_model` recorded, else an object."""
    src = getattr(model, "_xsurgery_source", None)
    if isinstance(src, dict):
        return src
    cls = type(model)
    return {"source": "object", "class": f"{cls.__module__}.{cls.__qualname__}", "model_kwargs": {},
            "pretrained": False}

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
    source = source_of(model)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, X_LAYERS):
            g = m.graph
            layers.append({"name": name, "degree": g.degree, "blocks": g.blocks, "graph": g.construction,
                           "seed": g.seed, "index_hash": g.hash()})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "surgery": getattr(model, "_xsurgery_spec", None),
        **({"pruned": model._xsurgery_pruned} if getattr(model, "_xsurgery_pruned", None) else {}),
        "input_size": getattr(model, "_xsurgery_input_size", None),
        "layers": layers,
        "versions": _versions(),
    }


def save(model: nn.Module, path: str, *, force: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``path`` (safetensors weights + manifest); returns the manifest.

    Args:
        model: any model: converted by :func:`xsurgery.convert` (from a name or an
            ``nn.Module``), loaded, or dense.
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


def load(path: str, *, model: nn.Module | None = None, map_location: str = "cpu", trust_source: bool = False,
         allow_nonfinite: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (no pickle).

    Nothing the file names is imported or called unless it is a registered library model
    (torchvision, timm, the zoo, ``hf/...``) taking the recorded JSON kwargs.

    Args:
        path: an xsurgery checkpoint.
        model: a freshly built *dense* model of the recorded architecture (needed when the
            checkpoint was converted from an object or an import path); the recorded surgery
            is applied to a copy of it. Without it, the model is rebuilt from the recorded
            source, which must be a library name (torchvision, timm, zoo, ``hf/...``).
        map_location: device of the loaded tensors.
        trust_source: let a manifest whose source is an import path ``pkg.mod:factory``
            import and call it (only for files you trust as you would a script).
        allow_nonfinite: accept NaN/inf weights.

    Returns:
        The converted model with the checkpoint's weights (``model`` itself is not modified).

    Raises:
        UserError: unreadable, truncated or altered file (a tensor not matching its digest
            is named), an untrusted source, no way to rebuild the model, non-finite weights,
            or weights/graphs that do not
            match the manifest.
    """
    from safetensors.torch import load_file

    from ..surgery import SurgerySpec, apply_surgery, resize_modules

    manifest = read_manifest(path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors checkpoint ({str(exc).splitlines()[0][:100]})") from exc
    _manifest.verify_weights(manifest, tensors, path, allow_nonfinite=allow_nonfinite)
    dense = uncompiled(model) if model is not None else _rebuild(path, manifest, trust_source=trust_source)
    if not isinstance(dense, nn.Module):
        raise UserError(f"model= must be an nn.Module (the dense model), got {type(dense).__name__}")
    if any(isinstance(m, X_LAYERS) for m in dense.modules()):
        raise UserError("model= must be the dense model as built, before xsurgery.convert; the checkpoint's surgery is applied to it")
    built = dense
    if manifest.get("pruned") is not None:  # channel counts of a pruned model: data, checked name by name
        import copy

        built = dense = resize_modules(copy.deepcopy(dense) if model is not None else dense,
                                       manifest["pruned"]["shapes"], f"{path}: its manifest's pruned shapes")
        model = None  # a copy already
    if manifest.get("surgery") is not None:
        try:
            # a spec saved before mix_points existed had the graph at every layer
            spec = SurgerySpec.from_dict({"mix_points": "every", **manifest["surgery"]})
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: its manifest's surgery is invalid ({str(exc).splitlines()[0][:160]})") from exc
        names = [d["name"] for d in manifest.get("layers", [])]
        built, decisions, _ = apply_surgery(dense, spec, only=names)
        missing = sorted(set(names) - {d.name for d in decisions if d.converted})
        if missing:
            raise UserError(f"{path}: its manifest converts {', '.join(safe_text(n, 80) for n in missing[:3])}, which the "
                            f"model has no convertible layer for; the file was altered, is corrupt, or model= is not "
                            f"the architecture it was saved from")
    elif model is not None:
        import copy

        built = copy.deepcopy(dense)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        built.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise UserError(f"{path}: weights do not match the model its manifest describes ({' '.join(first)[:160]})") from exc
    entries = {d["name"]: d for d in manifest.get("layers", [])}
    for n, m in built.named_modules():
        if isinstance(m, X_LAYERS):  # in range, distinct per block, the recorded D and G: not only the digests
            _manifest.check_index(path, n, m, entries.get(n))
    recorded = {d["name"]: d["index_hash"] for d in manifest.get("layers", [])}
    found = {n: m.graph.hash() for n, m in built.named_modules() if isinstance(m, X_LAYERS)}
    if recorded != found:
        bad = sorted(n for n in set(recorded) | set(found) if recorded.get(n) != found.get(n))
        raise UserError(f"{path}: graphs of {', '.join(bad[:3])} do not match the manifest; the file was altered, "
                        f"is corrupt, or model= is not the architecture it was saved from")
    built._xsurgery_manifest = manifest
    if manifest.get("pruned") is not None:
        built._xsurgery_pruned = manifest["pruned"]
    built._xsurgery_source = manifest["source"]
    if manifest.get("input_size"):
        built._xsurgery_input_size = manifest["input_size"]
    return built


def _rebuild(path: str, manifest: dict[str, Any], *, trust_source: bool = False) -> nn.Module:
    """The dense model from the recorded source: a registered library name, or an import
    path only with ``trust_source`` (checked before anything is imported)."""
    from ..models import create_model

    src = manifest["source"]
    name = src["source"]
    if name == "object":
        raise UserError(f"{path} was converted from an object of class {str(src.get('class'))[:80]}; pass the dense "
                        f"model: xsurgery.load(path, model=...) or --model pkg.mod:factory")
    _manifest.check_source(src, path, trust_source=trust_source)
    return create_model(name, src.get("model_kwargs") or {}, pretrained=False)


def load_dense(path: str, *, trust_source: bool = False, allow_nonfinite: bool = False) -> nn.Module:
    """The dense architecture a checkpoint was converted from (random weights), for a baseline
    such as ``xsurgery bench``: the file is first loaded and checked as :func:`load` does."""
    load(path, trust_source=trust_source, allow_nonfinite=allow_nonfinite)
    return _rebuild(path, read_manifest(path), trust_source=trust_source)


def resolve_model(
    source: str,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    *,
    model: str | None = None,
    trust_source: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """The one place that decides "checkpoint path or model name" (the CLI's MODEL argument).

    Args:
        source: a checkpoint path, or a model name / import path for ``create_model``.
        model_kwargs: factory kwargs (of ``source``, or of ``model`` for a checkpoint).
        pretrained: library weights when ``source`` is a name.
        model: for a checkpoint, an import path ``pkg.mod:factory`` (the user's own code,
            chosen on the command line) that builds the dense model to load into.
        trust_source: for a checkpoint, see :func:`load`.
        allow_nonfinite: for a checkpoint, see :func:`load`.
    """
    from ..models import create_model

    if is_checkpoint_path(source):
        if pretrained or (model_kwargs and not model):
            raise UserError("a checkpoint carries its own model; drop --model-kwargs/--pretrained "
                            "(or give the dense model's factory with --model pkg.mod:factory)")
        return load(source, model=create_model(model, model_kwargs) if model else None,
                    trust_source=trust_source, allow_nonfinite=allow_nonfinite)
    if model:
        raise UserError("--model only applies to a checkpoint; give the model itself as MODEL")
    return create_model(source, model_kwargs, pretrained)
