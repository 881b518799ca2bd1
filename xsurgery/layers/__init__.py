"""X-layers: XConv1d/2d/3d and XLinear, one :class:`SparsityConfig`, their functional forms,
the executions they run as, and the registry of layer kinds the surgery converts."""

from __future__ import annotations

from ._base import INITS, XBase
from ._config import MIX_POINTS, SparsityConfig
from ._conv import X_CONVS, XConv1d, XConv2d, XConv3d, XConvNd
from ._functional import (
    EXECUTIONS,
    Execution,
    auto_execution,
    conv_nd,
    dense_weight,
    list_executions,
    register_execution,
    x_conv1d,
    x_conv2d,
    x_conv3d,
    x_convnd,
    x_linear,
)
from ._kinds import X_LAYERS, LayerKind, kind_family, layer_kind, list_layer_kinds, register_layer_kind, x_layer_kind
from ._linear import XLinear, is_conv1d_linear

__all__ = [
    "EXECUTIONS",
    "INITS",
    "MIX_POINTS",
    "X_CONVS",
    "X_LAYERS",
    "Execution",
    "LayerKind",
    "SparsityConfig",
    "XBase",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XConvNd",
    "XLinear",
    "auto_execution",
    "conv_nd",
    "dense_weight",
    "is_conv1d_linear",
    "kind_family",
    "layer_kind",
    "list_executions",
    "list_layer_kinds",
    "register_execution",
    "register_layer_kind",
    "x_conv1d",
    "x_conv2d",
    "x_conv3d",
    "x_convnd",
    "x_layer_kind",
    "x_linear",
]
