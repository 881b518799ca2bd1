"""X-layers: XConv1d/2d/3d and XLinear, their functional forms and executions."""

from __future__ import annotations

from ._core import (
    EXECUTIONS,
    INITS,
    X_CONVS,
    X_LAYERS,
    XConv1d,
    XConv2d,
    XConv3d,
    XLinear,
    auto_execution,
    conv_nd,
    dense_weight,
    is_conv1d_linear,
    x_conv1d,
    x_conv2d,
    x_conv3d,
    x_convnd,
    x_linear,
)

__all__ = [
    "EXECUTIONS",
    "INITS",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XLinear",
    "X_CONVS",
    "X_LAYERS",
    "auto_execution",
    "conv_nd",
    "dense_weight",
    "is_conv1d_linear",
    "x_conv1d",
    "x_conv2d",
    "x_conv3d",
    "x_convnd",
    "x_linear",
]
