"""Verification: feeds, runtime-vs-torch errors, constant outputs, the perturbed copy, and whether
the all-dense file differs too."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ._trace import _flat_outputs
from .runtimes import Runtime


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


def _verify(prep: Any, rt: Runtime, sess: Any, tmp: str, threads: int | None, rtol: float, atol: float,
            result: Any, log: Callable[..., Any]) -> None:
    """Run the file on the verification input and compare with torch (raise above tolerance)."""
    from ..models import flat_tensors

    flat_v = flat_tensors(prep.example_v)
    feed_v = _feed(prep.in_names, flat_v)
    flat_ref = _flat_outputs(prep.ref)
    vsess = rt.verify_session(tmp, threads, made=sess)
    try:
        got = rt.run(vsess, feed_v)
    except Exception as exc:  # onnxruntime's own error types
        text = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime cannot run the exported model on inputs of shapes "
                        f"{[list(t.shape) for t in flat_v]} (batch/sequence changed to check the dynamic "
                        f"axes): {text}; try --static-batch"
                        + _dense_differs(prep, rt, threads, feed_v, flat_ref, atol, rtol, result.layers)) from exc
    if _constant(flat_ref, _flat_outputs(prep.out)) and all(torch.isfinite(r).all() for r in flat_ref):
        flat_ref, got = _verify_perturbed(prep, rt, threads, feed_v, result, log)
    abs_err, scale, rel = _errors(flat_ref, got)
    result.max_abs_err, result.max_rel_err = abs_err, rel
    log(f"verification (input {list(flat_v[0].shape)}): max abs err {abs_err:.3g}, max rel err {rel:.3g} "
        f"(relative to max|output| = {scale:.3g})")
    if not abs_err <= atol + rtol * scale:
        raise UserError(f"{rt.label} output differs from torch: max abs err {abs_err:.3g} > "
                        f"atol {atol:g} + rtol {rtol:g} * max|output| {scale:.3g}; nothing written"
                        + _dense_differs(prep, rt, threads, feed_v, flat_ref, atol, rtol, result.layers))


def _dense_differs(prep: Any, rt: Runtime, threads: int | None, feed: dict[str, Any], ref: list[torch.Tensor],
                   atol: float, rtol: float, choice: dict[str, str]) -> str:
    """What the file with every X-layer dense says about a verification failure: it differs too
    (an op of the model the exporter or runtime gets wrong, not the surgery), or not ("")."""
    dense = dict.fromkeys(choice, "dense")
    limit = f"an op of this model that the torch exporter or {rt.label} gets wrong (its limit, not the surgery's)"
    if choice == dense:  # the file is the dense one already
        return f"; every layer of the file is dense: {limit}"
    try:
        data = prep.to_bytes(dense)
    except Exception:  # noqa: BLE001 - this file only explains the failure above
        return ""
    try:
        abs_err, scale, _ = _errors(ref, rt.run(rt.verify_session(data, threads), feed))
    except Exception as exc:  # noqa: BLE001 - the runtime's own error types
        return f"; the file with every layer dense fails too ({(str(exc).strip() or type(exc).__name__).splitlines()[0][:80]}): {limit}"
    if abs_err <= atol + rtol * scale:
        return ""
    return f"; the file with every layer dense differs too (max abs err {abs_err:.3g}): {limit}"


def _verify_perturbed(prep: Any, rt: Runtime, threads: int | None, feed_v: dict[str, Any],
                      result: Any, log: Callable[..., Any]) -> tuple[list[torch.Tensor], list[Any]]:
    """Outputs that are the same for every input verify nothing: (torch's, the runtime's) outputs
    of a copy whose all-zero parameters are filled randomly, exported with the same layouts."""
    from ..models import call

    vmodel, filled = _perturbed(prep.base)
    with torch.no_grad():
        flat_ref = _flat_outputs(call(vmodel, prep.example_v))
        still = _constant(flat_ref, _flat_outputs(call(vmodel, prep.example)))
    if not filled or still:
        raise UserError("the model's outputs are the same for every input, so verification compares "
                        "nothing; check the weights (or pass --no-verify to export unverified)")
    log(f"the outputs are the same for every input; verifying a copy with {len(filled)} all-zero "
        f"parameter(s) ({', '.join(filled[:3])}) filled randomly, exported with the same layouts")
    got = rt.run(rt.verify_session(prep.to_bytes(result.layers, vmodel), threads), feed_v)
    result.verified_on = "perturbed copy: " + ", ".join(filled)
    return flat_ref, got
