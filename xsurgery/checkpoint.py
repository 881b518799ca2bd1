"""Checkpoints: one safetensors file with a JSON manifest in its metadata (no pickle).

The manifest records how to rebuild the model (source, kwargs, surgery spec) and each
X-layer's graph (degree, blocks, construction, seed, index hash); :func:`load` rebuilds
the source model, re-applies the surgery, loads the weights (index buffers included) and
checks every graph hash against the manifest.
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
        model: a model made by :func:`xsurgery.convert` or ``create_model``.
        path: output file (``.xs`` by convention).
        force: overwrite an existing file.
        extra: JSON-able fields added to the manifest under ``"extra"``.
    """
    from safetensors.torch import save_file

    manifest = manifest_of(model)
    if extra:
        manifest["extra"] = extra
    # clones: tied weights share storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
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


def load(path: str, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (no pickle).

    Raises:
        UserError: unreadable file, or weights/index that do not match the manifest.
    """
    from safetensors.torch import load_file

    from ._sources import create_model
    from .surgery import SurgerySpec, apply_surgery

    manifest = read_manifest(path)
    src = manifest["source"]
    model = create_model(src["source"], src.get("model_kwargs") or {}, pretrained=False)
    if manifest.get("surgery") is not None:
        model, _, _ = apply_surgery(model, SurgerySpec.from_dict(manifest["surgery"]))
    tensors = load_file(path, device=map_location)
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
