"""Why a weight-carrying module stays dense: modules with no X-layer form, tied tensors, weights read
by their parent, and weights computed by a parametrization, a prune mask or a legacy norm hook."""

from __future__ import annotations

from torch import nn

__all__ = ["direct_weight_users", "other_reason", "shared_tensors", "weight_hooks", "weight_params"]


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
