"""Structured pruning to a MACs budget (Torch-Pruning), and the record that rebuilds its shapes.

:func:`prune_to_macs` is the workflow a pruning user runs on a *trained* dense model:
Torch-Pruning's magnitude pruner (L2 importance, one ratio for every layer, the classifier
kept), the ratio found by bisection so that the model's MACs meet a budget. The pruned model
carries ``_xsurgery_pruned``: per module, the channel counts it was left with. That record is
data (integers for whitelisted attributes of conv, linear and norm modules), so a checkpoint
can rebuild the pruned shapes from the dense architecture with :func:`resize_modules` before
its weights are loaded: nothing in it chooses what is imported or called.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UserError

__all__ = ["MACS_TOL", "bisect_to_macs", "forward_order", "prune_to_macs", "pruned_shapes", "resize_modules",
           "tp_prune"]

MACS_TOL = 0.03  # relative MACs difference to the budget the bisection must reach
MAX_CHANNELS = 1 << 20

# module kind -> the integer attributes that give its parameter shapes
_ATTRS: dict[type, tuple[str, ...]] = {
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._NormBase: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
}


def _kind(m: nn.Module) -> type | None:
    return next((k for k in _ATTRS if isinstance(m, k)), None)


def forward_order(model: nn.Module, x: Any, call: Callable) -> list[str]:
    """Names of the conv/linear modules in the order the forward runs them."""
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, _n=n: seen.append(_n) if _n not in seen else None)
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            call(model, x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def tp_prune(model: nn.Module, ratio: float, x: torch.Tensor, round_to: int | None = None) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at ``ratio`` (L2 magnitude, last layer kept)."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise UserError("pruning needs Torch-Pruning: pip install 'xsurgery[tp]'") from exc
    out = copy.deepcopy(model).eval()
    order = forward_order(out, x, lambda m, v: m(v))
    ignored = [out.get_submodule(order[-1])] if order else []
    pruner = tp.pruner.MagnitudePruner(out, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return out


def bisect_to_macs(build: Callable[[float], nn.Module], macs: Callable[[nn.Module], int], target: int, lo: float,
                   hi: float, shrink: bool, tol: float = MACS_TOL) -> tuple[nn.Module, float]:
    """``build(p)`` whose MACs are nearest ``target``; MACs fall as ``p`` grows (``shrink``) or rise."""
    best, best_err, best_p = None, math.inf, lo
    for _ in range(14):
        if hi - lo < 2e-3:  # rounded widths: no finer step to find
            break
        mid = (lo + hi) / 2
        m = build(mid)
        got = macs(m)
        err = abs(got - target) / target
        if err < best_err:
            best, best_err, best_p = m, err, mid
        if err <= MACS_TOL / 3:
            break
        if (got > target) == shrink:
            lo = mid
        else:
            hi = mid
    if best is None or best_err > tol:
        raise UserError(f"could not match the MACs budget within {100 * tol:.0f}% (closest {100 * best_err:.1f}% off): "
                        f"a small model's widths move its MACs in steps; choose another budget")
    return best, best_p


def pruned_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per conv/linear/norm module, the integer attributes that give its parameter shapes."""
    out = {}
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is not None and name:
            out[name] = {a: int(getattr(m, a)) for a in _ATTRS[kind]}
    return out


def prune_to_macs(model: nn.Module, target_macs: int, input_size: tuple[int, ...], *,
                  round_to: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` pruned (Torch-Pruning, one ratio for all layers) to ``target_macs`` within
    :data:`MACS_TOL` (``round_to``: the nearest width step); returns the model and the record
    :func:`resize_modules` rebuilds it from (also set as ``model._xsurgery_pruned``)."""
    from ..analysis import report

    def macs(m: nn.Module) -> int:
        return int(report(m, input_size=input_size).totals["macs_after"])

    if target_macs < 1:
        raise UserError(f"the pruning budget must be a positive number of MACs, got {target_macs}")
    before = macs(model)
    if target_macs >= before:
        raise UserError(f"the pruning budget ({target_macs:,} MACs) is not below the model's {before:,} MACs")
    x = torch.randn(1, *input_size)
    was_training = model.training
    pruned, ratio = bisect_to_macs(lambda r: tp_prune(model, r, x, round_to), macs, target_macs, 0.0, 0.95,
                                   shrink=True, tol=math.inf if round_to else MACS_TOL)
    pruned.train(was_training)
    record = {"method": "torch-pruning magnitude (L2)", "pruning_ratio": round(ratio, 6), "round_to": round_to,
              "target_macs": int(target_macs), "macs": macs(pruned), "shapes": pruned_shapes(pruned)}
    for attr in ("_xsurgery_source", "_xsurgery_input_size"):
        if hasattr(model, attr):
            setattr(pruned, attr, getattr(model, attr))
    pruned._xsurgery_pruned = record
    return pruned, record


def _resized(m: nn.Module, attrs: dict[str, int], where: str) -> None:
    """Set ``m``'s shape attributes and give it fresh parameters/buffers of those shapes."""
    for a, v in attrs.items():
        setattr(m, a, v)
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.in_channels % m.groups or m.out_channels % m.groups:
            raise UserError(f"{where}: groups must divide the channels")
        shapes = {"weight": (m.out_channels, m.in_channels // m.groups, *m.kernel_size), "bias": (m.out_channels,)}
    elif isinstance(m, nn.Linear):
        shapes = {"weight": (m.out_features, m.in_features), "bias": (m.out_features,)}
    elif isinstance(m, nn.GroupNorm):
        if m.num_channels % m.num_groups:
            raise UserError(f"{where}: num_groups must divide num_channels")
        shapes = {"weight": (m.num_channels,), "bias": (m.num_channels,)}
    else:
        n = m.num_features
        shapes = {"weight": (n,), "bias": (n,), "running_mean": (n,), "running_var": (n,)}
    for attr, shape in shapes.items():
        old = getattr(m, attr, None)
        if isinstance(old, nn.Parameter):
            setattr(m, attr, nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad))
        elif isinstance(old, torch.Tensor):
            setattr(m, attr, old.new_zeros(shape))


def resize_modules(model: nn.Module, shapes: Any, where: str = "pruned shapes") -> nn.Module:
    """Give ``model``'s modules the recorded channel counts (in place; the weights are zeros until
    loaded). ``shapes`` is data: every name must be a conv/linear/norm module of the model and
    every value an integer for that kind's shape attributes; anything else is a ``UserError``."""
    if not isinstance(shapes, dict):
        raise UserError(f"{where} must be an object of module names")
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        m = modules.get(name) if isinstance(name, str) and name else None
        kind = _kind(m) if m is not None else None
        if kind is None:
            raise UserError(f"{where}: {str(name)[:80]!r} is not a conv, linear or norm module of the model")
        if not isinstance(attrs, dict) or set(attrs) != set(_ATTRS[kind]) or not all(
                type(v) is int and 1 <= v <= MAX_CHANNELS for v in attrs.values()):
            raise UserError(f"{where}: {name} needs the integers {', '.join(_ATTRS[kind])} in 1..{MAX_CHANNELS}")
        if any(getattr(m, a) != v for a, v in attrs.items()):
            _resized(m, attrs, f"{where}: {name}")
    return model
