"""One example input's structure: its tensors, names, description, and fresh copies of it.

An example is ``(args, kwargs)`` (torch.export's convention; :mod:`xsurgery.models.inputs` builds
them). Here: flattening it to tensors, naming them after ``forward``'s parameters (the ONNX
input names), describing it as JSON-able data (reports, manifests), one-line texts for
errors, and :func:`resample` (the same inputs with fresh values, for the output check and
export verification).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "Example", "batch_of", "call", "describe", "first_error_line", "flat_tensors", "input_names",
           "per_sample_size", "positional_names", "resample", "shapes_text"]

Example = tuple[tuple[Any, ...], dict[str, Any]]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in reversed(list(DTYPES.items()))}  # canonical name: the first spelling
MAX_ELEMENTS = 1 << 28  # a recorded or typed shape larger than this is a mistake, not an example

def _flat(obj: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        return [x for k, v in obj.items() for x in _flat(v, f"{prefix}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _flat(v, f"{prefix}.{i}")]
    return []


def positional_names(model: nn.Module, n: int) -> list[str]:
    """Names of the first ``n`` positional parameters of ``model.forward`` (``input_i`` past them)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i].name if i < len(params) else f"input_{i}" for i in range(n)]


def input_names(model: nn.Module, example: Example) -> list[str]:
    """One name per tensor of the example: ``input`` for a lone positional tensor, else the
    forward signature's names (``x``, ``input_ids``, ...) and the dict keys; tensors nested in
    a list get ``name.i``."""
    args, kwargs = example
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return ["input"]
    names = positional_names(model, len(args))
    flat = [n for name, a in zip(names, args) for n, _ in _flat(a, name)]
    flat += [n for k, v in kwargs.items() for n, _ in _flat(v, k)]
    return flat


def flat_tensors(example: Example) -> list[torch.Tensor]:
    args, kwargs = example
    return [t for _, t in _flat(list(args) + list(kwargs.values()), "")]


def describe(model: nn.Module, example: Example | None) -> list[dict[str, Any]] | None:
    """``[{"name", "shape", "dtype"(, "high")}]`` per input tensor (for reports and manifests)."""
    if example is None:
        return None
    out = []
    args, kwargs = example
    names = positional_names(model, len(args))
    entries = [(n, v, False) for n, v in zip(names, args)] + [(k, v, True) for k, v in kwargs.items()]
    for name, value, keyword in entries:
        for sub, t in _flat(value, name):
            d: dict[str, Any] = {"name": sub, "shape": list(t.shape), "dtype": _NAMES.get(t.dtype, str(t.dtype))}
            if not keyword:
                d["positional"] = True
            if sub != name:
                d["in_list"] = True
            if not (t.dtype.is_floating_point or t.dtype == torch.bool) and t.numel():
                d["high"] = int(t.max()) + 1
            out.append(d)
    return out


def per_sample_size(example: Example | None) -> list[int]:
    """The first tensor's shape without its batch axis (the report's ``input_size``)."""
    if example is None:
        return []
    tensors = flat_tensors(example)
    if not tensors:
        return []
    args = example[0]
    if args and isinstance(args[0], (list, tuple)):  # a list of images: each one is a sample
        return list(tensors[0].shape)
    return list(tensors[0].shape[1:])


def batch_of(example: Example | None) -> int:
    if example is None:
        return 1
    args = example[0]
    if args and isinstance(args[0], (list, tuple)):
        return len(args[0])
    tensors = flat_tensors(example)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def call(model: nn.Module, example: Example) -> Any:
    args, kwargs = example
    return model(*args, **kwargs)


def first_error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:200]}" if line else type(exc).__name__


def shapes_text(example: Example) -> str:
    """``[1, 16] int64, attention_mask [1, 16] int64`` -- for one-line errors."""
    parts = []
    for d in describe(nn.Identity(), example) or []:
        name = "" if d.get("positional") and not d.get("in_list") else d["name"] + " "
        parts.append(f"{name}{d['shape']} {d['dtype']}")
    return ", ".join(parts) or "no tensors"


def resample(example: Example, *, seed: int = 1, shape_fn=None) -> Example:
    """The same inputs (structure, dtypes, value ranges) with fresh values.

    ``shape_fn(name, tensor) -> shape`` may change shapes (export's verification run at another
    batch and sequence length); integer inputs stay within the original's range.
    """
    gen = torch.Generator().manual_seed(seed)

    def like(t: Any, name: str) -> Any:
        if isinstance(t, torch.Tensor):
            shape = tuple(shape_fn(name, t)) if shape_fn is not None else tuple(t.shape)
            if t.dtype.is_floating_point:
                return torch.randn(shape, generator=gen).to(dtype=t.dtype, device=t.device)
            if t.dtype == torch.bool or t.numel() == 0:
                return torch.ones(shape, dtype=t.dtype, device=t.device)
            lo, hi = int(t.min()), int(t.max())
            if lo == hi:
                return torch.full(shape, lo, dtype=t.dtype, device=t.device)
            return torch.randint(lo, hi + 1, shape, generator=gen).to(dtype=t.dtype, device=t.device)
        if isinstance(t, list):
            return [like(v, f"{name}.{i}") for i, v in enumerate(t)]
        if isinstance(t, tuple):
            return tuple(like(v, f"{name}.{i}") for i, v in enumerate(t))
        if isinstance(t, dict):
            return {k: like(v, f"{name}.{k}") for k, v in t.items()}
        return t

    args, kwargs = example
    return tuple(like(a, f"{i}") for i, a in enumerate(args)), {k: like(v, k) for k, v in kwargs.items()}
