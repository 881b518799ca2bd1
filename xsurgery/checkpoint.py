"""Checkpoints: one safetensors file with a JSON manifest in its metadata (no pickle).

The manifest records where the model came from (a library name with its kwargs, or, for a
model converted from an ``nn.Module`` object, ``"object"`` and its class for information
only), the surgery spec and each X-layer's graph (degree, blocks, construction, seed, index
hash). :func:`load` takes the dense model from the caller (``model=``) or rebuilds it from a
library name, re-applies the surgery, loads the weights (index buffers included) and checks
every graph hash against the manifest. Nothing read from the file chooses what is imported.

:func:`resolve_model` is the one place that decides "checkpoint path or model name".
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from ._errors import UserError
from ._version import __version__
from .layers import X_LAYERS

__all__ = ["FORMAT", "is_checkpoint_path", "load", "read_manifest", "resolve_model", "save", "write_atomic"]

CHECKPOINT_SUFFIXES = (".xs", ".safetensors")


def is_checkpoint_path(source: str) -> bool:
    """A string names a checkpoint when it ends like one or is an existing file."""
    return isinstance(source, str) and (source.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(source))


def source_of(model: nn.Module) -> dict[str, Any]:
    """Where ``model`` came from: what :func:`xsurgery._sources.create_model` recorded, else an object."""
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
        "input_size": getattr(model, "_xsurgery_input_size", None),
        "layers": layers,
        "versions": _versions(),
    }


def write_atomic(path: str, write, *, force: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; refuse to overwrite without ``force``."""
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str, *, force: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``path`` (safetensors weights + manifest); returns the manifest.

    Args:
        model: any model: converted by :func:`xsurgery.convert` (from a name or an
            ``nn.Module``), loaded, or dense.
        path: output file (``.xs`` by convention).
        force: overwrite an existing file.
        extra: JSON-able fields added to the manifest under ``"extra"``.
    """
    from safetensors.torch import save_file

    manifest = manifest_of(model)
    if extra:
        manifest["extra"] = extra
    # clones: tied weights share storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict(keep_vars=False).items()}
    meta = {_META_KEY: json.dumps(manifest, sort_keys=True)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), force=force)
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a checkpoint, validated; :class:`UserError` for anything unreadable."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise UserError(f"{path} is not a readable safetensors checkpoint ({str(exc).splitlines()[0][:100]})") from exc
    if _META_KEY not in meta:
        raise UserError(f"{path} has no xsurgery manifest; it was not written by xsurgery.save")
    try:
        manifest = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its manifest is not valid JSON ({exc.msg})") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported checkpoint format {manifest.get('format')} v{manifest.get('format_version')}")
    return manifest


def load(path: str, *, model: nn.Module | None = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (no pickle).

    Args:
        path: an xsurgery checkpoint.
        model: a freshly built *dense* model of the recorded architecture (needed when the
            checkpoint was converted from an object or an import path); the recorded surgery
            is applied to a copy of it. Without it, the model is rebuilt from the recorded
            source, which must be a library name (torchvision, timm, zoo).
        map_location: device of the loaded tensors.

    Returns:
        The converted model with the checkpoint's weights (``model`` itself is not modified).

    Raises:
        UserError: unreadable file, no way to rebuild the model, or weights/graphs that do not
            match the manifest.
    """
    from safetensors.torch import load_file

    from .surgery import SurgerySpec, apply_surgery

    manifest = read_manifest(path)
    dense = model if model is not None else _rebuild(path, manifest)
    if not isinstance(dense, nn.Module):
        raise UserError(f"model= must be an nn.Module (the dense model), got {type(dense).__name__}")
    if any(isinstance(m, X_LAYERS) for m in dense.modules()):
        raise UserError("model= must be the dense model as built, before xsurgery.convert; the checkpoint's surgery is applied to it")
    built = dense
    if manifest.get("surgery") is not None:
        built, _, _ = apply_surgery(dense, SurgerySpec.from_dict(manifest["surgery"]))
    elif model is not None:
        import copy

        built = copy.deepcopy(dense)
    tensors = load_file(path, device=map_location)
    try:
        built.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise UserError(f"{path}: weights do not match the model its manifest describes ({' '.join(first)[:160]})") from exc
    recorded = {d["name"]: d["index_hash"] for d in manifest.get("layers", [])}
    found = {n: m.graph.hash() for n, m in built.named_modules() if isinstance(m, X_LAYERS)}
    if recorded != found:
        bad = sorted(n for n in set(recorded) | set(found) if recorded.get(n) != found.get(n))
        raise UserError(f"{path}: graphs of {', '.join(bad[:3])} do not match the manifest; the file was altered, "
                        f"is corrupt, or model= is not the architecture it was saved from")
    built._xsurgery_manifest = manifest
    built._xsurgery_source = manifest["source"]
    if manifest.get("input_size"):
        built._xsurgery_input_size = manifest["input_size"]
    return built


def _rebuild(path: str, manifest: dict[str, Any]) -> nn.Module:
    """The dense model from the recorded source, only when it is a library name."""
    from ._sources import create_model, is_library_name

    src = manifest.get("source") or {}
    name = src.get("source") if isinstance(src, dict) else None
    if not is_library_name(name):
        what = f"an object of class {src.get('class')}" if name == "object" else f"{name!r}"
        raise UserError(f"{path} was converted from {what}; pass the dense model: xsurgery.load(path, model=...) "
                        f"or --model pkg.mod:factory")
    kwargs = src.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"{path}: its manifest's model_kwargs is not a mapping")
    return create_model(name, kwargs, pretrained=False)


def resolve_model(
    source: str,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    *,
    model: str | None = None,
) -> nn.Module:
    """The one place that decides "checkpoint path or model name" (the CLI's MODEL argument).

    Args:
        source: a checkpoint path, or a model name / import path for ``create_model``.
        model_kwargs: factory kwargs (of ``source``, or of ``model`` for a checkpoint).
        pretrained: library weights when ``source`` is a name.
        model: for a checkpoint, an import path ``pkg.mod:factory`` (the user's own code,
            chosen on the command line) that builds the dense model to load into.
    """
    from ._sources import create_model

    if is_checkpoint_path(source):
        if pretrained or (model_kwargs and not model):
            raise UserError("a checkpoint carries its own model; drop --model-kwargs/--pretrained "
                            "(or give the dense model's factory with --model pkg.mod:factory)")
        return load(source, model=create_model(model, model_kwargs) if model else None)
    if model:
        raise UserError("--model only applies to a checkpoint; give the model itself as MODEL")
    return create_model(source, model_kwargs, pretrained)
