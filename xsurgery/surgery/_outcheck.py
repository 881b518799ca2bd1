"""The converted model's outputs against the original's: same structure (types, keys, lengths,
ranks, dtypes; exact shapes only where the original's are deterministic)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError

__all__ = ["check_outputs"]


def _structure(obj: Any, lengths_vary: bool = False) -> Any:
    """Tensors -> ``(dtype, shape, shape_is_data_dependent)``; containers keep their keys/lengths."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype).replace("torch.", ""), tuple(obj.shape), lengths_vary)
    if isinstance(obj, dict):
        return ("dict", {k: _structure(v, lengths_vary) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        # a list of dicts is per-image instance results (torchvision detection): their lengths
        # depend on the scores, i.e. on the weights, which the surgery changes
        per_instance = lengths_vary or (bool(obj) and all(isinstance(v, dict) for v in obj) and isinstance(obj, list))
        return ("seq", [_structure(v, per_instance) for v in obj])
    return ("other", type(obj).__name__)


def _diff(ref: Any, ref2: Any, out: Any, path: str) -> str | None:
    """First difference between the original's output structure and the converted one's."""
    where = path or "output"
    if ref[0] != out[0]:
        return f"{where}: the original returns {ref[0] if ref[0] != 'other' else ref[1]}, the converted model " \
               f"{out[0] if out[0] != 'other' else out[1]}"
    if ref[0] == "tensor":
        _, dtype, shape, varies = ref
        if out[1] != dtype:
            return f"{where}: dtype {out[1]} instead of {dtype}"
        if len(out[2]) != len(shape):
            return f"{where}: rank {len(out[2])} instead of {len(shape)} (shape {list(out[2])} vs {list(shape)})"
        deterministic = not varies and ref2 is not None and ref2[0] == "tensor" and ref2[2] == shape
        if deterministic and out[2] != shape:
            return f"{where}: shape {list(out[2])} instead of {list(shape)}"
        return None
    if ref[0] == "dict":
        if list(ref[1]) != list(out[1]):
            return f"{where}: keys {list(out[1])} instead of {list(ref[1])}"
        other = ref2[1] if ref2 is not None and ref2[0] == "dict" else {}
        for k in ref[1]:
            msg = _diff(ref[1][k], other.get(k), out[1][k], f"{path}[{k!r}]")
            if msg:
                return msg
        return None
    if ref[0] == "seq":
        if len(ref[1]) != len(out[1]):
            return f"{where}: {len(out[1])} items instead of {len(ref[1])}"
        other = ref2[1] if ref2 is not None and ref2[0] == "seq" and len(ref2[1]) == len(ref[1]) else [None] * len(ref[1])
        for i, (a, b, c) in enumerate(zip(ref[1], other, out[1])):
            msg = _diff(a, b, c, f"{path}[{i}]")
            if msg:
                return msg
        return None
    return None if ref == out else f"{where}: {out[1]} instead of {ref[1]}"


@torch.no_grad()
def check_outputs(original: nn.Module, converted: nn.Module, example: tuple[tuple, dict]) -> None:
    """Run both models (eval mode) on ``example`` and compare their outputs' structure.

    Always compared: container types, dict keys, sequence lengths, tensor ranks and dtypes.
    Exact shapes are compared only where the original's are deterministic: the original runs
    a second time on fresh values of the same shapes (:func:`xsurgery.models.inputs.resample`), and
    a tensor whose shape changed between the two runs, or that sits in a list of dicts
    (torchvision detection's per-image boxes, whose counts depend on the scores and so on the
    weights the surgery replaced), is compared by rank only.

    Raises:
        UserError: the original fails on the example (with the model's own first error line),
            or the converted model fails or returns a different structure.
    """
    from ..models import call, first_error_line, resample, shapes_text

    was = [(m, m.training) for model in (original, converted) for m in model.modules()]  # a frozen BN stays frozen
    original.eval()
    converted.eval()
    try:
        try:
            ref = _structure(call(original, example))
        except Exception as exc:
            raise UserError(f"the model does not run on the example input ({shapes_text(example)}): "
                            f"{first_error_line(exc)}; give an input it takes (--input / example_inputs)") from exc
        try:
            ref2 = _structure(call(original, resample(example)))
        except Exception:
            ref2 = None  # fresh values broke it (e.g. ids out of a range it needs): trust no exact shape
        try:
            out = _structure(call(converted, example))
        except Exception as exc:
            raise UserError(f"the converted model fails on the example input ({first_error_line(exc)}); "
                            f"exclude the layer involved (--exclude) or skip the check (--no-check)") from exc
    finally:
        for m, training in was:
            m.training = training
    msg = _diff(ref, ref2, out, "output")
    if msg:
        raise UserError(f"the converted model's output differs from the original's: {msg} (--no-check skips this check)")
