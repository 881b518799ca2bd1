"""The one way a checked manifest and its weights become a model, whatever file held them.

An ``.xs`` file and a Hugging Face folder both end here once their manifest is validated and
their tensors match its digests: the recorded surgery is applied to the dense model, the
weights are loaded strictly, and every X-layer's index is checked against the manifest.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .._util.text import safe_text
from ..errors import UserError
from ..layers import X_LAYERS
from ..models import versioned
from . import _manifest

__all__ = ["assemble"]


def assemble(path: str, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], dense: nn.Module, *,
             copy_dense: bool, map_location: str = "cpu") -> nn.Module:
    """The converted model: ``manifest``'s surgery applied to ``dense``, ``tensors`` loaded
    (strict), every graph checked. ``copy_dense``: ``dense`` is the caller's, leave it as it is."""
    from ..surgery import SurgerySpec, apply_surgery, resize_modules

    if not isinstance(dense, nn.Module):
        raise UserError(f"model= must be an nn.Module (the dense model), got {type(dense).__name__}")
    if any(isinstance(m, X_LAYERS) for m in dense.modules()):
        raise UserError("model= must be the dense model as built, before xsurgery.convert; the checkpoint's surgery is applied to it")
    built = dense
    if manifest.get("pruned") is not None:  # channel counts of a pruned model: data, checked name by name
        built = dense = resize_modules(copy.deepcopy(dense) if copy_dense else dense, manifest["pruned"]["shapes"],
                                       f"{path}: its manifest's pruned shapes")
        copy_dense = False  # a copy already
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
    elif copy_dense:
        built = copy.deepcopy(dense)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        built.load_state_dict(versioned(built, tensors), strict=True)
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
        raise UserError(f"{path}: graphs of {', '.join(safe_text(n, 80) for n in bad[:3])} do not match the manifest; "
                        f"the file was altered, is corrupt, or model= is not the architecture it was saved from")
    built._xsurgery_manifest = manifest
    if manifest.get("pruned") is not None:
        built._xsurgery_pruned = manifest["pruned"]
    built._xsurgery_source = manifest["source"]
    if manifest.get("input_size"):
        built._xsurgery_input_size = manifest["input_size"]
    return built
