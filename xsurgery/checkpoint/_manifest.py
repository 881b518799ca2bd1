"""Checkpoint trust: a manifest is data, never code.

Everything read from a checkpoint passes here before it is used:

* :func:`read_bounded` reads the safetensors header with bounds on its size, the JSON's
  nesting depth, every list/dict count and every string length;
* :func:`validate` checks the manifest's schema (types of every field xsurgery uses; a
  surgery plan inline, never a path);
* :func:`check_source` lets a model source through only when it is a registered library
  name (torchvision, timm, the zoo, ``hf/...``) with JSON kwargs the factory accepts; an
  import path ``pkg.mod:callable`` needs the caller's consent, a checkpoint path never passes;
* :func:`weights_digest` / :func:`verify_weights`: sha256 of every tensor's bytes with its
  dtype and shape, and a refusal of NaN/inf weights unless asked for.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import struct
from typing import Any

import torch

from .._util.text import safe_repr, safe_text
from ..errors import UserError

__all__ = ["check_index", "check_finite", "check_source", "read_bounded", "validate", "verify_weights", "weights_digest"]

MAX_HEADER_BYTES = 64 << 20  # the whole safetensors header (tensor table + manifest)
MAX_MANIFEST_CHARS = 16 << 20
MAX_DEPTH = 12
MAX_ITEMS = 200_000  # entries of any one list or dict
MAX_NODES = 2_000_000
MAX_STRING = 4096
MAX_INPUT_DIM = 1 << 16
DIGEST_ALGORITHM = "sha256"
FORMAT = "xsurgery-checkpoint"
FORMAT_VERSION = 1
CONSENT = "pass trust_source=True (CLI --trust-source) if you trust this file, or build the model yourself and call xsurgery.load(path, model=...)"


def _fail(path: str, what: str) -> UserError:
    return UserError(f"{path}: {what}; the file was altered or is not an xsurgery checkpoint")


# --------------------------------------------------------------------------- reading


def read_header(path: str) -> dict[str, Any]:
    """The safetensors header of ``path`` (tensor table + ``__metadata__``), size-checked
    against the file before it is parsed."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, "the file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise _fail(path, f"its header claims {n} bytes (file {size}, limit {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a number of thousands of digits
        raise _fail(path, f"its header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _fail(path, "its header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and 0 <= o <= size for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _fail(path, f"tensor {safe_repr(name, 80)} has no valid data_offsets")
        data_end = max(data_end, offsets[1])
    if 8 + n + data_end != size:
        # safetensors accepts trailing bytes; a checkpoint is exactly header + tensor data
        raise _fail(path, f"it is {size} bytes but its tensors end at {8 + n + data_end} (truncated or appended)")
    return header


def _bounded(value: Any, path: str, where: str = "manifest", depth: int = 0, count: list[int] | None = None) -> None:
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > MAX_NODES:
        raise _fail(path, f"the manifest has more than {MAX_NODES} values")
    if depth > MAX_DEPTH:
        raise _fail(path, f"{safe_text(where, 80)} is nested deeper than {MAX_DEPTH}")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise _fail(path, f"{where} is a string of {len(value)} characters (limit {MAX_STRING})")
    elif isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise _fail(path, f"{where} has {len(value)} entries (limit {MAX_ITEMS})")
        for k, v in value.items():
            if len(k) > MAX_STRING:
                raise _fail(path, f"{where} has a key of {len(k)} characters")
            _bounded(v, path, f"{where}.{k[:40]}", depth + 1, count)
    elif isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise _fail(path, f"{where} has {len(value)} entries (limit {MAX_ITEMS})")
        for i, v in enumerate(value):
            _bounded(v, path, f"{where}[{i}]", depth + 1, count)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, f"{safe_text(where, 80)} is NaN or infinite")
    elif isinstance(value, int) and not -2**63 <= value < 2**63:
        raise _fail(path, f"{safe_text(where, 80)} is an integer out of the 64-bit range")


def read_bounded(path: str, meta_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, tensor table) of a checkpoint, bounded in size, depth and counts."""
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta_key not in meta:
        raise UserError(f"{path} has no xsurgery manifest; it was not written by xsurgery.save")
    text = meta[meta_key]
    if not isinstance(text, str) or len(text) > MAX_MANIFEST_CHARS:
        raise _fail(path, f"its manifest is not a string of at most {MAX_MANIFEST_CHARS} characters")
    try:
        manifest = json.loads(text)
    except RecursionError:
        raise _fail(path, f"its manifest is nested deeper than {MAX_DEPTH}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its manifest is not valid JSON ({exc.msg})") from None
    except ValueError:  # an integer of thousands of digits
        raise _fail(path, "its manifest holds a number too long to read") from None
    if not isinstance(manifest, dict):
        raise _fail(path, "its manifest is not a JSON object")
    _bounded(manifest, path)
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    return manifest, table


# ---------------------------------------------------------------------------- schema


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(ok: bool, path: str, what: str) -> None:
    if not ok:
        raise _fail(path, what)


def validate(manifest: dict[str, Any], path: str) -> None:
    """Types of every manifest field xsurgery reads; a plan must be inline rules."""
    src = manifest.get("source")
    _need(isinstance(src, dict), path, "manifest source must be an object")
    _need(isinstance(src.get("source"), str) and bool(src["source"]), path, "manifest source.source must be a name")
    _need(isinstance(src.get("model_kwargs", {}), dict), path, "manifest source.model_kwargs must be an object")
    _need(isinstance(src.get("pretrained", False), bool), path, "manifest source.pretrained must be true or false")
    surgery = manifest.get("surgery")
    _need(surgery is None or isinstance(surgery, dict), path, "manifest surgery must be an object or null")
    if surgery is not None:
        plan = surgery.get("plan", [])
        if isinstance(plan, str):
            raise UserError(f"{path}: the manifest's surgery plan names a file ({safe_repr(plan, 80)}); a checkpoint's plan "
                            f"is stored inline and no file it names is read")
        _need(isinstance(plan, list) and all(isinstance(r, dict) for r in plan), path,
              "manifest surgery.plan must be a list of rules")
    size = manifest.get("input_size")
    _need(size is None or (isinstance(size, list) and 1 <= len(size) <= 4
                           and all(_is_int(s) and 1 <= s <= MAX_INPUT_DIM for s in size)),
          path, f"manifest input_size must be up to 4 integers in 1..{MAX_INPUT_DIM}")
    layers = manifest.get("layers", [])
    _need(isinstance(layers, list), path, "manifest layers must be a list")
    for d in layers:
        _need(isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("index_hash"), str),
              path, "every entry of manifest layers needs a name and an index_hash")
        _need(all(d.get(k) is None or (_is_int(d[k]) and 1 <= d[k] <= MAX_ITEMS * 64) for k in ("degree", "blocks")),
              path, "manifest layers' degree and blocks must be positive integers")
    digest = manifest.get("weights")
    _need(digest is None or (isinstance(digest, dict) and isinstance(digest.get("tensors"), dict)), path,
          "manifest weights must be an object with a tensors table")
    pruned = manifest.get("pruned")
    _need(pruned is None or (isinstance(pruned, dict) and isinstance(pruned.get("shapes"), dict)), path,
          "manifest pruned must be an object with a shapes table")
    extra = manifest.get("extra")
    _need(extra is None or isinstance(extra, dict), path, "manifest extra must be an object")


# ---------------------------------------------------------------------------- sources


def _factory(name: str):
    """The callable a registered name builds with, or None when the name is not registered."""
    from ..models import timm_is_model, torchvision_names, zoo_models

    if name.startswith("hf/"):
        return "hf"
    if name.startswith("timm/"):
        import timm

        return timm.models.model_entrypoint(name[5:]) if timm.is_model(name[5:]) else None
    if name in zoo_models():
        return zoo_models()[name]
    if name in torchvision_names():
        import torchvision

        return torchvision.models.get_model_builder(name)
    if timm_is_model(name):
        import timm

        return timm.models.model_entrypoint(name)
    return None


def _json_only(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_json_only(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_only(v) for k, v in value.items())
    return False


def _accepted(fn) -> set[str] | None:
    """Keyword names ``fn`` accepts, following ``**kwargs`` into the class its return
    annotation names (torchvision/timm builders pass them on); None when open-ended."""
    names: set[str] = set()
    seen = 0
    while fn is not None and seen < 3:
        seen += 1
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        params = list(sig.parameters.values())
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
        ret = sig.return_annotation
        if isinstance(ret, str):
            ret = getattr(inspect.getmodule(fn), ret.split(".")[-1], None)
        fn = ret.__init__ if isinstance(ret, type) else None
    return None


# keyword arguments that make a library fetch or read weights (torchvision ``weights``,
# ``weights_backbone``; timm ``pretrained``, ``pretrained_cfg``, ``checkpoint_path``; hub
# ``repo_id``/``url``/``cache_dir`` ...): a file never chooses them
_FETCHING_WORDS = {"weights", "pretrained", "checkpoint", "url", "urls", "hub", "cache", "download", "repo",
                   "revision", "auth"}


def _fetching(key: str) -> bool:
    words = key.lower().split("_")
    return bool(_FETCHING_WORDS & set(words)) or words[-1] in ("path", "file", "dir", "files")


def check_source(source: dict[str, Any], path: str, *, trust_source: bool = False) -> None:
    """Refuse, before anything is imported or called, a source a file must not choose.

    Raises:
        UserError: a checkpoint path (no recursion through sources), an import path without
            ``trust_source``, an unregistered name, non-JSON kwargs, or kwargs the factory
            does not take.
    """
    name = source["source"]
    kwargs = source.get("model_kwargs") or {}
    if not _json_only(kwargs):
        raise _fail(path, "model_kwargs must hold only JSON values")
    if os.path.isfile(name) or name.endswith((".xs", ".safetensors", ".onnx", ".pt", ".pth")):
        raise UserError(f"{path}: its manifest names another file ({safe_repr(name, 80)}) as its model source; "
                        f"a checkpoint never loads another file")
    if ":" in name:
        if trust_source:
            return
        raise UserError(f"{path}: its model source is the import path {safe_repr(name, 80)}, which would run code the "
                        f"file names; {CONSENT}")
    fetching = sorted(k for k in kwargs if _fetching(k))
    if fetching:
        raise UserError(f"{path}: its model_kwargs set {safe_text(', '.join(fetching), 80)}, which would choose "
                        f"weights or files to fetch; a checkpoint carries its own weights and never downloads. "
                        f"Build the model yourself and call xsurgery.load(path, model=...) if you need them")
    factory = _factory(name)
    if factory is None:
        raise UserError(f"{path}: its model source {safe_repr(name, 80)} is not a torchvision, timm, hf/ or zoo model here; "
                        f"{CONSENT}")
    if factory == "hf" or not kwargs:
        return
    accepted = _accepted(factory)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise UserError(f"{path}: model {safe_repr(name, 80)} takes no keyword argument(s) {', '.join(unknown)[:120]}; "
                            f"the manifest's model_kwargs were altered")


# ----------------------------------------------------------------------------- weights


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes of ``t``."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest's ``weights`` entry: per tensor dtype, shape and sha256."""
    return {
        "algorithm": DIGEST_ALGORITHM,
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                        "sha256": tensor_digest(v)} for k, v in sorted(tensors.items())},
    }


def check_finite(tensors: dict[str, torch.Tensor], what: str, *, allow_nonfinite: bool = False,
                 flag: str = "allow_nonfinite=True (CLI --allow-nonfinite)") -> None:
    """Refuse NaN/inf in any floating tensor (named), unless ``allow_nonfinite``."""
    if allow_nonfinite:
        return
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise UserError(f"{what}: tensor {safe_repr(name, 80)} holds {bad} NaN/inf value(s); pass {flag} to accept that")


def verify_weights(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], path: str, *,
                   allow_nonfinite: bool = False) -> None:
    """Compare every tensor with the manifest's digest (naming the first that differs),
    then refuse non-finite weights."""
    digest = manifest.get("weights")
    if digest is None:
        raise _fail(path, "its manifest has no weights digest (written by an older xsurgery? save it again)")
    if digest.get("algorithm") != DIGEST_ALGORITHM:
        raise _fail(path, f"unknown weights digest algorithm {safe_repr(str(digest.get('algorithm')), 40)}")
    table = digest["tensors"]
    missing, extra = sorted(set(table) - set(tensors)), sorted(set(tensors) - set(table))
    if missing or extra:
        name = (missing or extra)[0]
        raise _fail(path, f"tensor {safe_repr(name, 80)} is {'missing from the file' if missing else 'not in the manifest digest'}")
    for name in sorted(tensors):
        rec = table[name]
        if not isinstance(rec, dict) or rec.get("sha256") != tensor_digest(tensors[name]):
            raise _fail(path, f"tensor {safe_repr(name, 80)} does not match its sha256 in the manifest")
    check_finite(tensors, path, allow_nonfinite=allow_nonfinite)


def check_index(path: str, name: str, layer: Any, recorded: dict[str, Any] | None) -> None:
    """An X-layer's loaded index buffer, checked for itself whatever the digests say: ``G*D``
    entries, every one an input in range, the ``D`` inputs of each block distinct, and the
    degree and blocks the manifest records for the layer."""
    d, g, n = layer.degree, layer.blocks, layer.in_features
    index = layer.index.detach().to("cpu")
    where = f"layer {safe_repr(name, 80)}"
    if recorded is not None:
        for key, have in (("degree", d), ("blocks", g)):
            if recorded.get(key) is not None and recorded[key] != have:
                raise _fail(path, f"{where} records {key} {recorded[key]} but its surgery gives {have}")
    if index.is_floating_point() or index.is_complex() or index.numel() != g * d:
        raise _fail(path, f"{where}'s index has {index.numel()} entries, not blocks x degree = {g} x {d}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise _fail(path, f"{where}'s index holds inputs outside 0..{n - 1}")
    rows = index.reshape(g, d).sort(dim=1).values
    if d > 1 and bool((rows[:, 1:] == rows[:, :-1]).any()):
        raise _fail(path, f"{where}'s index repeats an input within a block")
