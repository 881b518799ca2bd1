"""Local weights: a dense state dict from a file, loaded into a model before any surgery.

A weights file is data, never code: safetensors (an xsurgery ``.xs`` checkpoint of a *dense*
model is one), or a torch file read with ``torch.load(weights_only=True)``, whose unpickler
refuses every global that is not a tensor type, so a pickle carrying code is refused before
anything in it runs. A plain pickle is never unpickled otherwise.

The file must match the model exactly: missing or unexpected keys and shape mismatches are
one line naming the first few. Common wrappers are undone: a ``{"state_dict": ...}`` or
``{"model": ...}`` dict (timm's and torchvision's training scripts) and a ``module.`` prefix
on every key (a DistributedDataParallel model saved as is).
"""

from __future__ import annotations

import json
import os
import stat
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._util.text import safe_text
from ..errors import UserError

__all__ = ["load_weights", "read_state_dict"]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
SHOW = 3  # names quoted in an error


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= os.path.getsize(path) - 8 and head[8:9] == b"{"


def _check_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UserError(f"cannot read weights {safe_text(path)}: {exc.strerror or type(exc).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"weights {safe_text(path)} is not a regular file (a FIFO, device or folder); give a file")


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            manifest = meta.get("xsurgery")
            if manifest is not None:
                try:
                    surgery = json.loads(manifest).get("surgery")
                except (ValueError, AttributeError, RecursionError):
                    surgery = None
                if surgery is not None:
                    raise UserError(f"weights {safe_text(path)} is a converted (sparse) xsurgery checkpoint; "
                                    f"--weights takes dense weights (load a converted model with xsurgery.load)")
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"weights {safe_text(path)} is not a readable safetensors file "
                        f"({safe_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)})") from None


def _read_torch(path: str) -> Any:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = ("it names code to call (a pickle that could run code)" if "Unsupported global" in str(exc)
               else "it is not a file of tensors only, e.g. a plain pickle")
        raise UserError(f"weights {safe_text(path)}: torch.load(weights_only=True) refused it, {why}; it was refused "
                        f"without running it: save a plain state dict "
                        f"(safetensors.torch.save_file(model.state_dict(), ...))") from None
    except Exception as exc:  # RuntimeError/EOFError/... for files of other kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"weights {safe_text(path)} is neither safetensors nor a torch file "
                        f"({safe_text(first, 120)}); give a .safetensors or torch.save'd state dict") from None


def _unwrap(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is not None:
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"weights {safe_text(path)} is not a state dict (a mapping of names to tensors); "
                        f"save model.state_dict()")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"weights {safe_text(path)}: entry {safe_text(str(bad[0]), 80)} is not a named tensor; "
                        f"save model.state_dict()")
    out = dict(obj)
    if all(k.startswith("module.") for k in out):  # a DistributedDataParallel model saved as is
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors or ``torch.load(weights_only=True)``), on CPU."""
    path = os.fspath(path)
    _check_file(path)
    obj = _read_safetensors(path) if _is_safetensors(path) else _read_torch(path)
    return _unwrap(obj, path)


def _names(keys: list[str]) -> str:
    shown = ", ".join(safe_text(k, 80) for k in keys[:SHOW])
    return shown + (f" and {len(keys) - SHOW} more" if len(keys) > SHOW else "")


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load the dense state dict in ``path`` into ``model`` (in place; returned).

    Raises:
        UserError: unreadable file, a pickle with code, a converted checkpoint, or keys or
            shapes that do not match the model (the first few named).
    """
    tensors = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more shape mismatches)" if len(shapes) > 1 else ""
        problems.append(f"shape of {safe_text(k, 80)}: file {list(tensors[k].shape)}, model {list(own[k].shape)}{more}")
    if problems:
        raise UserError(f"weights {safe_text(path)} do not match the model: {'; '.join(problems)}; give the weights "
                        f"of this architecture (check the model's kwargs)")
    with torch.no_grad():
        model.load_state_dict(versioned(model, tensors), strict=True)
    return model


def versioned(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> OrderedDict:
    """``tensors`` carrying ``model``'s own state-dict metadata (each module's ``_version``).

    A safetensors file has none, and some modules refuse a state dict without it (torchvision's
    MNASNet raises on version ``None``). The versions come from the code's model, never from
    the file.
    """
    out = OrderedDict(tensors)
    meta = getattr(model.state_dict(keep_vars=True), "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out
