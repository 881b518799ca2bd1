"""Why a weight-carrying module stays dense: modules with no X-layer form, tied tensors, weights read
by their parent, and weights computed by a parametrization, a prune mask or a legacy norm hook."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layers import layer_kind
from ._fx import fallback_roles, trace_roles
from ._probe import probe_layers
from ._spec import Decision, LayerRule, SurgerySpec, match_any

__all__ = ["LayerContext", "direct_weight_users", "is_layer_candidate", "other_decisions", "other_reason", "shared_tensors",
           "weight_hooks", "weight_params"]


def weight_params(m: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A module's own matrix/kernel parameters (``weight``, ``in_proj_weight``, ``weight_ih_l0``)."""
    return [(n, p) for n, p in m._parameters.items()
            if p is not None and p.dim() >= 2 and (n == "weight" or n.endswith("_weight") or n.startswith("weight_"))]


def other_reason(m: nn.Module) -> tuple[str, str]:
    """(kind, reason) of a weight-carrying module the surgery has no X-layer for."""
    name = type(m).__name__
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose", f"transposed conv ({name}) has no X-layer form"
    if isinstance(m, nn.RNNBase):
        return "recurrent", f"recurrent layer ({name}) has no X-layer form"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", f"embedding ({name}) is a lookup, not a matmul"
    if isinstance(m, nn.MultiheadAttention):
        return "mha", "nn.MultiheadAttention reads in_proj_weight directly (F.multi_head_attention_forward)"
    return "other", f"{name} has no X-layer form"


def shared_tensors(model: nn.Module) -> dict[str, list[str]]:
    """``"module.param"`` -> the other modules holding the same tensor (tied weights)."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mname)
    shared: dict[str, list[str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None and len(set(owners[id(p)])) > 1:
                shared[f"{mname}.{pname}"] = [o for o in owners[id(p)] if o != mname]
    return shared


def direct_weight_users(model: nn.Module) -> set[str]:
    """Layers whose parent reads their ``.weight`` itself instead of calling them."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out |= {f"{name}.{c}" if name else c for c, _ in m.named_modules() if c}
    return out


def weight_hooks(m: nn.Module) -> str | None:
    """Why a layer whose weight is computed (parametrized, pruned, weight-/spectral-normed) stays dense.

    An X-layer holds a plain compact weight: converting would silently drop the parametrization,
    the prune mask or the norm, so such a layer is kept dense with its reason.
    """
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(m):
        what = "; ".join(f"{p} by {', '.join(type(f).__name__ for f in m.parametrizations[p])}"
                         for p in m.parametrizations)
        return (f"weight parametrized ({what}); kept dense, as an X-layer would drop it "
                f"(torch.nn.utils.parametrize.remove_parametrizations first to convert)")
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            return "pruned (prune mask on its weight); kept dense, as an X-layer would drop the mask " \
                   "(torch.nn.utils.prune.remove first to convert)"
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            return f"legacy {kind} on {hook.name}; kept dense, as an X-layer would drop it " \
                   f"(torch.nn.utils.remove_{kind} first to convert)"
    return None


def other_decisions(name: str, m: nn.Module) -> list[Decision]:
    """The decision of a weight-carrying module the surgery has no X-layer for (none when it
    carries no weight matrix): MoE expert stacks, ConvTranspose, RNNs, Embedding, ..."""
    weights = weight_params(m)
    experts = [(n, p) for n, p in m._parameters.items()  # [E, out, in], E > 1 (not a [1, N, C] token)
               if p is not None and p.dim() == 3 and p.shape[0] > 1]
    if experts and not weights:  # MoE experts: [E, out, in] stacks run by an expert-indexed matmul
        w = experts[0][1]
        stacks = ", ".join(f"{n} {list(p.shape)}" for n, p in experts)
        return [Decision(name, "experts", False, f"MoE experts ({stacks}) run as an expert-indexed matmul; "
                         f"no X-layer form (kept dense)", int(w.shape[-1]), int(w.shape[-2]), None)]
    if weights:
        kind, reason = other_reason(m)
        w = weights[0][1]
        return [Decision(name, kind, False, reason, int(w.shape[1]), int(w.shape[0]), list(w.shape[2:]) or None)]
    return []


# nn.ConvNd / nn.Linear subclasses with the same forward (safe to replace)
_SAME_FORWARD = {"torch.nn.modules.linear.NonDynamicallyQuantizableLinear", "timm.layers.linear.Linear"}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_forward(m: nn.Module) -> bool:
    """The module computes what its torch base class does (safe to replace by an X-layer).

    A subclass that only changes ``__init__`` (torchvision's ``Conv3DSimple``) qualifies; one
    that overrides ``forward`` / ``_conv_forward`` (timm's ``StdConv2d``) does not, unless
    known to compute the same.
    """
    cls, base = type(m), layer_kind(m).base
    if base is None or cls is base or _qualname(cls) in _SAME_FORWARD:
        return True
    return cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)


def is_layer_candidate(m: nn.Module) -> bool:
    """A conv/linear module of a kind the surgery knows (convertible or with a reason why not)."""
    return layer_kind(m) is not None


class LayerContext:
    """What decides a layer beyond the spec: its role (stem, classifier), how its weights are
    read (tied, hooked, read directly), and whether a subclass computes its base class's."""

    def __init__(self, model: nn.Module, example: Any) -> None:
        self.trace = trace_roles(model)
        if not self.trace.ok:
            roles = fallback_roles(model)
            self.trace.stems, self.trace.classifiers = roles.stems, roles.classifiers
        self.custom = {n for n, m in model.named_modules() if is_layer_candidate(m) and not _same_forward(m)}
        self.probe = probe_layers(model, example, self.custom)
        self.trace.stems |= self.probe.raw_input
        self.direct = direct_weight_users(model)
        self.shared = shared_tensors(model)

    def reason(self, name: str, m: nn.Module, d: Decision, spec: SurgerySpec, rule: LayerRule | None) -> str | None:
        """Why the layer stays dense (``None``: it converts), the first reason that applies."""
        tied = [f"{p} with {', '.join(self.shared[f'{name}.{p}'])}" for p in ("weight", "bias")
                if f"{name}.{p}" in self.shared]
        if tied:
            return f"{'; '.join(tied)} shared (tied weights are never converted)"
        hooked = weight_hooks(m)
        if hooked:
            return hooked
        if name in self.direct:
            return "weights read directly by nn.MultiheadAttention"
        if name in self.probe.direct:
            return f"weights read directly ({self.probe.direct[name]} of {name}.weight outside its forward); kept dense"
        if name in self.custom and name not in self.probe.same_forward:
            base = layer_kind(m).base
            why = "differs from" if name in self.probe.differs else "is not known to compute"
            return f"custom {type(m).__name__} (its forward {why} nn.{base.__name__ if base else 'Linear'}'s)"
        if d.kind in ("depthwise", "grouped"):
            return f"{d.kind} conv (groups={m.groups}) is never converted"
        if name in self.trace.direct:
            return "weights read directly (e.g. F.linear(x, layer.weight)), not called as a module"
        if match_any(name, spec.exclude):
            return f"excluded by --exclude {match_any(name, spec.exclude)}"
        if rule is not None and rule.skip:
            return f"kept dense by plan rule {rule.pattern!r}"
        if match_any(name, spec.include) or rule is not None:
            return None
        if d.kind not in spec.layers:
            return f"{d.kind} not in --layers"
        if name in self.trace.stems and not spec.include_stem:
            return "stem (--include-stem)"
        if name in self.trace.classifiers and not spec.include_classifier:
            return "classifier (--include-classifier)"
        if d.in_channels < spec.min_channels:
            return f"narrower than --min-channels {spec.min_channels}"
        return None
