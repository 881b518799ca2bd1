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
from .._version import __version__
from ..errors import UserError
from ..layers import X_LAYERS
from . import _hf_folder, _manifest
from ._apply import assemble

__all__ = ["FORMAT", "is_checkpoint_path", "load", "load_dense", "read_manifest", "resolve_model", "save", "write_atomic"]

CHECKPOINT_SUFFIXES = (".xs", ".safetensors")


def is_checkpoint_path(source: str) -> bool:
    """A string names a checkpoint when it ends like one, is an existing file, or is a folder
    with a ``config.json`` (a Hugging Face folder written by ``save(..., format="hf")``)."""
    return isinstance(source, str) and (source.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(source)
                                        or _hf_folder.is_folder(source))


def source_of(model: nn.Module) -> dict[str, Any]:
    """Where ``model`` came from: what :func:`xsurgery.models.sources.create_model` recorded, else an object."""
    src = getattr(model, "_xsurgery_source", None)
    if isinstance(src, dict):
        return src
    cls = type(model)
    return {"source": "object", "class": f"{cls.__module__}.{cls.__qualname__}", "model_kwargs": {},
            "pretrained": False}

FORMAT = _manifest.FORMAT
FORMAT_VERSION = _manifest.FORMAT_VERSION
SAVE_FORMATS = ("xs", "hf")
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


def save(model: nn.Module, path: str, *, force: bool = False, extra: dict[str, Any] | None = None,
         format: str = "xs", tokenizer: Any = None, processor: Any = None) -> dict[str, Any]:
    """Write ``model`` to ``path`` (safetensors weights + manifest); returns the manifest.

    Args:
        model: any model: converted by :func:`xsurgery.convert` (from a name or an
            ``nn.Module``), loaded, or dense.
        path: output file (``.xs`` by convention), or with ``format="hf"`` the folder to write.
        force: overwrite an existing file (with ``format="hf"``: a folder xsurgery wrote).
        extra: JSON-able fields added to the manifest under ``"extra"``.
        format: ``"xs"`` (one safetensors file) or ``"hf"``: a Hugging Face folder
            (``config.json`` with the manifest as its ``xsurgery`` section,
            ``model.safetensors``, tokenizer/processor files) for a transformers model.
        tokenizer: with ``format="hf"``, a transformers tokenizer to save beside the model.
        processor: with ``format="hf"``, a transformers processor / image processor to save.
    """
    if format not in SAVE_FORMATS:
        raise UserError(f"unknown save format {format!r}; use one of {', '.join(SAVE_FORMATS)}")
    if format == "xs" and str(path).endswith(("/", os.sep)):
        raise UserError(f"{path} names a folder: pass format='hf' to write a Hugging Face folder, or name an .xs file")
    if format == "xs" and (tokenizer is not None or processor is not None):
        raise UserError("tokenizer= and processor= are saved only in a Hugging Face folder: pass format='hf'")
    manifest = manifest_of(model)
    if extra:
        manifest["extra"] = extra
    # clones: tied weights share storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    manifest["weights"] = _manifest.weights_digest(tensors)
    if format == "hf":
        _hf_folder.write_folder(model, path, manifest, tensors, force=force, tokenizer=tokenizer, processor=processor)
        return manifest
    meta = {_META_KEY: json.dumps(manifest, sort_keys=True)}
    write_safetensors(path, tensors, metadata=meta, force=force)
    return manifest


def check_save_target(path: str, *, format: str = "xs", force: bool = False) -> None:
    """Refuse, before any work, an output :func:`save` could not write (exists without
    ``force``, a folder where a file is wanted or the reverse, a missing or read-only folder)."""
    from .._util.io import check_output

    if format not in SAVE_FORMATS:
        raise UserError(f"unknown save format {format!r}; use one of {', '.join(SAVE_FORMATS)}")
    if format == "hf":
        _hf_folder.check_target(path, force=force)
    else:
        check_output(path, force=force)


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a checkpoint, validated; :class:`UserError` for anything unreadable."""
    if _hf_folder.is_folder(path):
        return _hf_folder.read_folder_manifest(path)
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
        path: an xsurgery checkpoint, or a Hugging Face folder written by
            ``save(..., format="hf")`` (the dense model is built from its ``config.json``,
            only from transformers' own classes; ``trust_source`` does not apply).
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

    if _hf_folder.is_folder(path):
        return _hf_folder.load_folder(path, model=model, map_location=map_location, allow_nonfinite=allow_nonfinite)
    manifest = read_manifest(path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors checkpoint ({str(exc).splitlines()[0][:100]})") from exc
    _manifest.verify_weights(manifest, tensors, path, allow_nonfinite=allow_nonfinite)
    dense = uncompiled(model) if model is not None else _rebuild(path, manifest, trust_source=trust_source)
    return assemble(path, manifest, tensors, dense, copy_dense=model is not None, map_location=map_location)


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
    if _hf_folder.is_folder(path):
        return _hf_folder.dense_of_folder(path)
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
