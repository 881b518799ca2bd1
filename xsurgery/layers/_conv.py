"""X-convolutions: ``nn.Conv1d/2d/3d`` whose output channels read only D input channels each.

The connectivity is a block expander (:mod:`xsurgery.graphs`): G blocks of outputs, block g
reads the inputs ``index[g]``. The layer owns a compact weight ``[C_out, D, *kernel]`` and the
flattened index as a persistent int64 buffer, and runs through a registered execution
(:mod:`xsurgery.layers._functional`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _ntuple

from ._base import XBase, check_init, copy_dense, keep_weights, sparsity_of
from ._config import SparsityConfig
from ._functional import conv_nd, x_convnd

__all__ = ["X_CONVS", "XConv1d", "XConv2d", "XConv3d", "XConvNd"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class XConvNd(XBase):
    """Expander-sparse ``nn.ConvNd`` (N = ``_dims``); arguments as :class:`XConv2d`."""

    _dims: int = 2
    _dense_cls: type[nn.modules.conv._ConvNd] = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        config: SparsityConfig | None = None,
        *,
        device=None,
        dtype=None,
        **sparsity: Any,
    ) -> None:
        super().__init__()
        config, graph = sparsity_of(config, sparsity)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
        tup = _ntuple(self._dims)
        self.in_channels = self.in_features = int(in_channels)
        self.out_channels = self.out_features = int(out_channels)
        self.kernel_size = tup(kernel_size)
        self.stride = tup(stride)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.dilation = tup(dilation)
        self.padding_mode = padding_mode
        self._init_graph(self.in_features, self.out_features, config, graph)
        self._finish_init((self.out_features, self.degree, *self.kernel_size), bias, device, dtype)

    @property
    def kind(self) -> str:
        return "pointwise" if all(k == 1 for k in self.kernel_size) else "conv"

    def reset_parameters(self) -> None:
        """He (Kaiming normal, ReLU gain) with fan_in = D * prod(kernel), the inputs each output reads.

        Variance-preserving like torchvision's and timm's conv init, so activations keep their
        scale through deep X-networks; the bias as nn.ConvNd's with the same fan_in.
        """
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            bound = 1 / math.sqrt(self.degree * math.prod(self.kernel_size))
            nn.init.uniform_(self.bias, -bound, bound)

    def _padding_args(self):
        if self.padding_mode == "zeros":
            return self.padding
        if isinstance(self.padding, str):
            raise ValueError("string padding needs padding_mode='zeros'")
        # F.pad wants (last-dim left, last-dim right, ..., first-dim left, first-dim right)
        return tuple(p for pad in reversed(self.padding) for p in (pad, pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        execution = self.resolved_execution()  # from the buffer's device: under fx, x is a Proxy
        if execution == "masked" and (w := self._cached_dense(x)) is not None:
            return conv_nd(x, w, self.bias, self.stride, self._padding_args(), self.dilation, 1, self.padding_mode,
                           self._dims)
        return x_convnd(
            x, self.weight, self.index, self.bias, self.stride, self._padding_args(), self.dilation,
            blocks=self.blocks, execution=execution, padding_mode=self.padding_mode,
            skip_gather=self._identity, in_features=self.in_channels, dims=self._dims,
        )

    def extra_repr(self) -> str:
        ones, zeros = (1,) * self._dims, (0,) * self._dims
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != ones:
            s += f", stride={self.stride}"
        if self.padding != zeros:
            s += f", padding={self.padding}"
        if self.dilation != ones:
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return f"{s}, {self.graph_repr()}"

    @classmethod
    def from_dense(
        cls, conv: nn.modules.conv._ConvNd, config: SparsityConfig | None = None, *, init: str = "kaiming",
        **sparsity: Any,
    ) -> XConvNd:
        """Build from a dense ``nn.ConvNd`` of the same N (``groups == 1``) with the same hyper-parameters.

        ``init="keep"`` copies the dense weights of the kept connections; ``"kaiming"``
        draws fresh ones. ``config`` and ``sparsity`` as the constructor's.
        """
        want = cls._dense_cls.__name__
        if not isinstance(conv, cls._dense_cls) or conv.groups != 1:
            raise ValueError(f"{cls.__name__}.from_dense needs an nn.{want} with groups=1 "
                             f"(grouped/depthwise convs are not converted)")
        check_init(init)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.bias is not None, conv.padding_mode, config,
            device=conv.weight.device, dtype=conv.weight.dtype, **sparsity,
        )
        if init == "keep":
            keep_weights(layer, conv)
        return layer

    def to_dense(self) -> nn.modules.conv._ConvNd:
        """The equivalent plain ``nn.ConvNd`` (zeros where no connection exists)."""
        conv = self._dense_cls(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        copy_dense(self, conv)
        return conv


class XConv1d(XConvNd):
    """Expander-sparse ``nn.Conv1d`` on ``[N, C, L]``; arguments as :class:`XConv2d`."""

    _dims = 1
    _dense_cls = nn.Conv1d


class XConv2d(XConvNd):
    """Expander-sparse ``nn.Conv2d``: each output channel reads ``degree`` input channels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
            padding_mode: as ``nn.Conv2d`` (no ``groups``: grouped sources are not converted).
        config: a :class:`~xsurgery.layers.SparsityConfig` (default: every input read, C = 1).
        device, dtype: as ``nn.Conv2d``.
        **sparsity: any :class:`~xsurgery.layers.SparsityConfig` field, overriding ``config``
            (``compress=4``, ``degree=64``, ``mixing=1``, ...); ``graph`` may also be a
            prebuilt :class:`~xsurgery.graphs.BipartiteGraph`.
    """

    _dims = 2
    _dense_cls = nn.Conv2d


class XConv3d(XConvNd):
    """Expander-sparse ``nn.Conv3d`` on ``[N, C, T, H, W]``; arguments as :class:`XConv2d`."""

    _dims = 3
    _dense_cls = nn.Conv3d


X_CONVS: dict[type[nn.Module], type[XConvNd]] = {nn.Conv1d: XConv1d, nn.Conv2d: XConv2d, nn.Conv3d: XConv3d}
