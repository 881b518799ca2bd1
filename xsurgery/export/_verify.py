"""Verification helpers: feeds, ORT-vs-torch errors, constant outputs and the perturbed copy."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def _to_cpu(example: tuple) -> tuple:
    def cpu(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu()
        if isinstance(v, (list, tuple)):
            return type(v)(cpu(t) for t in v)
        return v

    args, kwargs = example
    return tuple(cpu(a) for a in args), {k: cpu(v) for k, v in kwargs.items()}


def _feed(names: list[str], tensors: list[torch.Tensor]) -> dict[str, Any]:
    return {n: t.numpy() for n, t in zip(names, tensors)}


def _errors(ref: list[torch.Tensor], got: list) -> tuple[float, float, float]:
    """(max abs error, max |ref|, max abs error / max |ref|) over all outputs."""
    if len(ref) != len(got):
        raise UserError(f"the ONNX model has {len(got)} outputs, torch {len(ref)}")
    abs_err, scale = 0.0, 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        r64 = r.detach().double()
        g64 = torch.from_numpy(g).double()
        # max() would drop a NaN silently (max(0.0, nan) is 0.0): refuse it outright
        for who, t in (("torch", r64), ("ONNX Runtime", g64)):
            if not bool(torch.isfinite(t).all()):
                raise UserError(f"{who}'s output {i} holds NaN/inf on the verification input, so nothing can be "
                                f"verified; check the weights (or pass --no-verify to export unverified)")
        if g64.shape != r64.shape:
            raise UserError(f"ONNX output shape {tuple(g64.shape)} differs from torch's {tuple(r64.shape)}")
        abs_err = max(abs_err, (g64 - r64).abs().max().item() if r64.numel() else 0.0)
        scale = max(scale, r64.abs().max().item() if r64.numel() else 0.0)
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    return abs_err, scale, rel


def _constant(outputs: list[torch.Tensor], first: list[torch.Tensor]) -> bool:
    """True when every output is the same for every input row (of the verification batch
    and of the first example): such a comparison checks nothing about the layers."""
    for o, f in zip(outputs, first):
        if o.dim() == 0 or o.shape[0] == 0 or f.dim() == 0 or f.shape[0] == 0:
            return False
        row = f[:1].detach()
        if o.shape[1:] != row.shape[1:] or not torch.equal(o.detach(), row.expand_as(o)):
            return False
    return True


def _perturbed(model: nn.Module, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy whose all-zero floating parameters (a zero-initialised head, as torchvision's
    ViT) hold small random values, so its outputs depend on the input."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.is_floating_point() and p.numel() and not bool(p.any()):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
                filled.append(name)
    return out, filled
