"""The layer kinds the surgery converts, registered: dense class -> X class, shape, MACs.

A kind answers, for a dense module, whether it is one of its layers, its (C_in, C_out, kernel),
its family (``pointwise``, ``conv``, ``linear``, or ``depthwise``/``grouped`` convs that stay
dense) and the MACs of one call; and for its X-layer the MACs before and after. Surgery,
counting and tracing ask the registry, so a new kind (say ConvTranspose) is one
:func:`register_layer_kind` entry plus its X-layer class; the export gives it an ONNX form in
its own registry (``xsurgery.export``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._base import XBase
from ._conv import XConv1d, XConv2d, XConv3d, XConvNd
from ._linear import XLinear, is_conv1d_linear

__all__ = ["X_LAYERS", "LayerKind", "kind_family", "layer_kind", "list_layer_kinds", "register_layer_kind",
           "x_layer_kind"]

Shape = tuple[int, int, "list[int] | None"]


@dataclass(frozen=True)
class LayerKind:
    """One convertible layer kind.

    Attributes:
        name: registry key (``conv2d``, ``linear``, ``hf_conv1d``).
        x_class: the X-layer that replaces it (has ``from_dense(module, config, init=...)``).
        matches: the dense module is of this kind (subclasses included).
        base: the torch class whose ``forward`` a subclass must keep to be replaceable; ``None``
            when ``matches`` alone decides.
        shape: (C_in, C_out, kernel or None).
        macs: dense MACs of one call ``(module, input, output)``.
        x_macs: (before, after) MACs of one call of its X-layer ``(layer, output)``.
    """

    name: str
    x_class: type[XBase]
    matches: Callable[[nn.Module], bool]
    base: type[nn.Module] | None
    shape: Callable[[nn.Module], Shape]
    macs: Callable[[nn.Module, torch.Tensor, torch.Tensor], int]
    x_macs: Callable[[XBase, torch.Tensor], tuple[int, int]]


_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add a kind; a duplicate name raises."""
    if kind.name in _KINDS:
        raise ValueError(f"layer kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def list_layer_kinds() -> list[str]:
    return list(_KINDS)


def layer_kind(m: nn.Module) -> LayerKind | None:
    """The registered kind of a dense module (``None``: not a convertible kind)."""
    if isinstance(m, XBase):
        return None
    return next((k for k in _KINDS.values() if k.matches(m)), None)


def x_layer_kind(m: nn.Module) -> LayerKind | None:
    """The registered kind whose X-layer ``m`` is."""
    return next((k for k in _KINDS.values() if type(m) is k.x_class), None) or \
        next((k for k in _KINDS.values() if isinstance(m, k.x_class)), None)


def kind_family(m: nn.Module) -> str:
    """``linear``, ``pointwise`` (1x1 conv), ``conv`` (kxk), or ``depthwise``/``grouped`` convs."""
    if isinstance(m, XBase):
        return m.kind
    kernel = layer_kind(m).shape(m)[2]
    if kernel is None:
        return "linear"
    groups = getattr(m, "groups", 1)
    if groups > 1:
        return "depthwise" if groups == m.in_channels else "grouped"
    return "pointwise" if all(k == 1 for k in kernel) else "conv"


def _conv_shape(m: nn.Module) -> Shape:
    return m.in_channels, m.out_channels, list(m.kernel_size)


def _conv_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _xconv_macs(m: XConvNd, out: torch.Tensor) -> tuple[int, int]:
    area = math.prod(m.kernel_size)
    return out.numel() * m.in_channels * area, out.numel() * m.degree * area


def _xlinear_macs(m: XLinear, out: torch.Tensor) -> tuple[int, int]:
    return out.numel() * m.in_features, out.numel() * m.degree


for _dense, _x in ((nn.Conv1d, XConv1d), (nn.Conv2d, XConv2d), (nn.Conv3d, XConv3d)):
    register_layer_kind(LayerKind(
        _dense.__name__.lower(), _x, lambda m, c=_dense: isinstance(m, c), _dense, _conv_shape, _conv_macs,
        _xconv_macs))
register_layer_kind(LayerKind(
    "linear", XLinear, lambda m: isinstance(m, nn.Linear), nn.Linear,
    lambda m: (m.in_features, m.out_features, None), lambda m, i, o: o.numel() * m.in_features, _xlinear_macs))
register_layer_kind(LayerKind(
    "hf_conv1d", XLinear, is_conv1d_linear, None,
    lambda m: (int(m.weight.shape[0]), int(m.weight.shape[1]), None),  # stored [in, out]
    lambda m, i, o: o.numel() * int(m.weight.shape[0]), _xlinear_macs))

X_LAYERS: tuple[type[XBase], ...] = tuple(dict.fromkeys(k.x_class for k in _KINDS.values()))
