"""X-layers: convolutions and linear layers whose outputs read only D inputs each.

The connectivity is a block expander (:mod:`xsurgery.graphs`): G blocks of outputs, block
g reads the inputs ``index[g]``. The layer owns a compact weight ``[C_out, D, kh, kw]``
(linear: ``[C_out, D]``) and the flattened index as a persistent int64 buffer.

Two executions compute the same function:

* ``gather``: ``conv2d(x.index_select(1, index), weight, groups=G)`` (a grouped conv over
  the k * C_in gathered channels);
* ``masked``: scatter the compact weight into the dense ``[C_out, C_in, kh, kw]`` weight and
  run the plain conv. This is the reference in tests, and faster where G is large.

``execution="auto"`` picks per layer with :func:`auto_execution`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from ..graphs import BipartiteGraph, build_graph, degree_for

__all__ = [
    "EXECUTIONS",
    "X_CONVS",
    "X_LAYERS",
    "XConv1d",
    "XConv2d",
    "XConv3d",
    "XLinear",
    "auto_execution",
    "dense_weight",
    "is_conv1d_linear",
    "x_conv1d",
    "x_conv2d",
    "x_conv3d",
    "x_convnd",
    "x_linear",
]

# Gather (a grouped conv over the k*C_in gathered channels) wins on CPU when every block has
# enough outputs to amortise its share of the gather; below that, the masked-dense conv does.
# Thresholds from tools/bench_layers.py --sweep (366 layer shapes x block counts, torch eager
# and training step; README, Performance): they cut the time lost to the wrong choice from
# 90 to about 20-26 dense-layer units against the earlier "blocks <= 64" rule.
MIN_OUTPUTS_PER_BLOCK = {"linear": 64, "pointwise": 16, "conv": 8}


def auto_execution(
    blocks: int, out_features: int, degree: int, in_features: int, device: torch.device | None = None,
    kind: str = "conv",
) -> str:
    """The execution ``auto`` resolves to for a layer of this shape (kind: linear, pointwise, conv)."""
    if blocks == 1 or degree == in_features:
        return "masked"  # full degree is a dense layer; masked runs exactly the dense conv
    if device is not None and device.type != "cpu":
        return "masked"  # GPUs: one dense GEMM beats G small ones
    return "gather" if out_features // blocks >= MIN_OUTPUTS_PER_BLOCK[kind] else "masked"


def dense_weight(weight: torch.Tensor, index: torch.Tensor, in_features: int, blocks: int) -> torch.Tensor:
    """Scatter a compact ``[C_out, D, ...]`` weight into the dense ``[C_out, C_in, ...]`` one.

    Differentiable in ``weight``; ``index`` is the flat ``[G * D]`` index.
    """
    out_features, degree = weight.shape[:2]
    rows = index.view(blocks, 1, degree).expand(blocks, out_features // blocks, degree)
    rows = rows.reshape(out_features, degree, *([1] * (weight.dim() - 2))).expand_as(weight)
    dense = weight.new_zeros((out_features, in_features, *weight.shape[2:]))
    return dense.scatter(1, rows, weight)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_nd(x, weight, bias, stride, padding, dilation, groups, padding_mode, dims):
    if padding_mode != "zeros":
        x = F.pad(x, padding, mode=padding_mode)  # padding here is the 2N-tuple F.pad wants
        padding = 0
    return _CONV_FN[dims](x, weight, bias, stride, padding, dilation, groups)


def x_convnd(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    blocks: int,
    execution: str = "gather",
    padding_mode: str = "zeros",
    skip_gather: bool = False,
    in_features: int | None = None,
    dims: int | None = None,
) -> torch.Tensor:
    """Functional X-conv in 1, 2 or 3 spatial dims.

    Args:
        x: ``[N, C_in, *spatial]``.
        weight: compact ``[C_out, D, *kernel]``.
        index: flat ``[G * D]`` gathered input channels.
        blocks: G.
        execution: ``gather`` or ``masked`` (same math).
        padding_mode: as ``nn.ConvNd``; for non-``zeros`` modes ``padding`` is the F.pad
            2N-tuple.
        skip_gather: the index is the identity, so ``gather`` may skip ``index_select``.
        in_features: C_in for ``masked`` (default ``x.shape[1]``; a constant traces better).
        dims: spatial dims N (default ``weight.dim() - 2``; give it where ``weight`` is a
            tracing proxy).
    """
    dims = dims or weight.dim() - 2
    if execution == "gather":
        if not skip_gather:
            x = x.index_select(1, index)
        return conv_nd(x, weight, bias, stride, padding, dilation, blocks, padding_mode, dims)
    if execution == "masked":
        w = dense_weight(weight, index, in_features or x.shape[1], blocks)
        return conv_nd(x, w, bias, stride, padding, dilation, 1, padding_mode, dims)
    raise ValueError(f"unknown execution {execution!r}; use one of {EXECUTIONS}")


def x_conv1d(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:func:`x_convnd` on ``[N, C_in, L]`` with a ``[C_out, D, k]`` weight."""
    return x_convnd(x, weight, index, *args, dims=1, **kwargs)


def x_conv2d(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:func:`x_convnd` on ``[N, C_in, H, W]`` with a ``[C_out, D, kh, kw]`` weight."""
    return x_convnd(x, weight, index, *args, dims=2, **kwargs)


def x_conv3d(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:func:`x_convnd` on ``[N, C_in, T, H, W]`` with a ``[C_out, D, kt, kh, kw]`` weight."""
    return x_convnd(x, weight, index, *args, dims=3, **kwargs)


def x_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    blocks: int,
    execution: str = "gather",
    in_features: int | None = None,
    skip_gather: bool = False,
) -> torch.Tensor:
    """Functional X-linear on inputs of any leading shape ``[..., C_in]``."""
    if execution == "gather":
        out_features, degree = weight.shape
        lead = x.shape[:-1]
        if not skip_gather:
            x = x.index_select(-1, index)
        xg = x.reshape(-1, blocks, degree).transpose(0, 1)  # [G, M, D]
        w = weight.view(blocks, out_features // blocks, degree).transpose(1, 2)  # [G, D, O/G]
        y = torch.bmm(xg, w).transpose(0, 1).reshape(*lead, out_features)
        return y if bias is None else y + bias
    if execution == "masked":
        return F.linear(x, dense_weight(weight, index, in_features or x.shape[-1], blocks), bias)
    raise ValueError(f"unknown execution {execution!r}; use one of {EXECUTIONS}")


EXECUTIONS = ("auto", "gather", "masked")


class _XBase(nn.Module):
    """Graph bookkeeping shared by XConv2d and XLinear."""

    in_features: int
    out_features: int
    graph_name: str
    graph_seed: int | None
    degree: int
    blocks: int

    def _init_graph(
        self,
        in_features: int,
        out_features: int,
        degree: int | None,
        compress: float | None,
        mixing: int,
        graph: str | BipartiteGraph,
        seed: int,
        blocks: int | None,
        execution: str,
    ) -> None:
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; use one of {EXECUTIONS}")
        if isinstance(graph, BipartiteGraph):
            g = graph
            if (g.in_features, g.out_features) != (in_features, out_features):
                raise ValueError(
                    f"graph is {g.in_features}->{g.out_features} but the layer is "
                    f"{in_features}->{out_features}"
                )
        else:
            if degree is None and compress is None:
                compress = 1.0
            d = degree_for(in_features, compress=compress, degree=degree)
            g = build_graph(
                in_features, out_features, d, blocks, mixing=mixing, construction=graph, seed=seed
            )
        self.degree, self.blocks = g.degree, g.blocks
        self.graph_name, self.graph_seed = g.construction, g.seed
        self.execution = execution
        self.register_buffer("index", g.index.reshape(-1).clone(), persistent=True)
        self._refresh_identity()

    @property
    def graph(self) -> BipartiteGraph:
        """The layer's graph, rebuilt from its index buffer (reflects a loaded state dict)."""
        return BipartiteGraph(
            self.in_features, self.out_features, self.degree, self.blocks,
            self._index_cpu.view(self.blocks, self.degree), self.graph_name, self.graph_seed,
        )

    @property
    def mixing(self) -> float:
        return self.blocks * self.degree / self.in_features

    def resolved_execution(self, device: torch.device | None = None) -> str:
        if self.execution != "auto":
            return self.execution
        kind = "linear" if isinstance(self, XLinear) else (
            "pointwise" if all(k == 1 for k in self.kernel_size) else "conv")
        return auto_execution(self.blocks, self.out_features, self.degree, self.in_features,
                              device or self.index.device, kind)

    def _refresh_identity(self) -> None:
        # gather can be skipped when the index is the identity (k = 1 unshuffled, grouped);
        # a plain bool so that tracing and export see no data-dependent branch. A CPU copy
        # of the index keeps the graph readable when the module lives on the meta device.
        if self.index.device.type != "meta":
            self._index_cpu = self.index.detach().cpu()
        n = self._index_cpu.numel()
        self._identity = n == self.in_features and bool(torch.equal(self._index_cpu, torch.arange(n)))

    def _cached_dense(self, x) -> torch.Tensor | None:
        """Inference only: the scattered dense weight, kept until the weight or index changes.

        Masked execution otherwise scatters on every call, which made it 1.4-1.6x slower than
        the dense model in eager inference (docs/bench). Not used with autograd, tracing or
        compiling, where the scatter must stay in the graph.
        """
        if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or torch.jit.is_tracing():
            return None
        if torch.compiler.is_compiling():
            return None
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device, self.index._version, self.index.data_ptr())
        if getattr(self, "_dense_key", None) != key:
            self._dense = dense_weight(w.detach(), self.index, self.in_features, self.blocks)
            self._dense_key = key
        return self._dense

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_identity()


def _graph_repr(m: _XBase) -> str:
    return f"degree={m.degree}, blocks={m.blocks}, graph={m.graph_name}"


class _XConvNd(_XBase):
    """Expander-sparse ``nn.ConvNd`` (N = ``_dims``): each output channel reads ``degree`` inputs;
    arguments as :class:`XConv2d`."""

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
        *,
        degree: int | None = None,
        compress: float | None = None,
        mixing: int = 2,
        graph: str | BipartiteGraph = "random",
        seed: int = 0,
        blocks: int | None = None,
        execution: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
        tup = _ntuple(self._dims)
        self.in_channels = self.in_features = int(in_channels)
        self.out_channels = self.out_features = int(out_channels)
        self.kernel_size = tup(kernel_size)
        self.stride = tup(stride)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.dilation = tup(dilation)
        self.padding_mode = padding_mode
        self._init_graph(in_channels, out_channels, degree, compress, mixing, graph, seed, blocks, execution)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, self.degree, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if device is not None:
            self.index = self.index.to(device)
        self.reset_parameters()

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
        return f"{s}, {_graph_repr(self)}"

    @classmethod
    def from_dense(
        cls,
        conv: nn.modules.conv._ConvNd,
        *,
        compress: float | None = None,
        degree: int | None = None,
        mixing: int = 2,
        graph: str | BipartiteGraph = "random",
        seed: int = 0,
        blocks: int | None = None,
        init: str = "kaiming",
        execution: str = "auto",
    ) -> _XConvNd:
        """Build from a dense ``nn.ConvNd`` of the same N (``groups == 1``) with the same hyper-parameters.

        ``init="keep"`` copies the dense weights of the kept connections; ``"kaiming"``
        draws fresh ones.
        """
        want = cls._dense_cls.__name__
        if not isinstance(conv, cls._dense_cls) or conv.groups != 1:
            raise ValueError(f"{cls.__name__}.from_dense needs an nn.{want} with groups=1 "
                             f"(grouped/depthwise convs are not converted)")
        _check_init(init)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.bias is not None, conv.padding_mode, degree=degree, compress=compress,
            mixing=mixing, graph=graph, seed=seed, blocks=blocks, execution=execution,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        if init == "keep":
            _keep_weights(layer, conv)
        return layer

    def to_dense(self) -> nn.modules.conv._ConvNd:
        """The equivalent plain ``nn.ConvNd`` (zeros where no connection exists)."""
        conv = self._dense_cls(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        _copy_dense(self, conv)
        return conv


class XConv1d(_XConvNd):
    """Expander-sparse ``nn.Conv1d`` on ``[N, C, L]``; arguments as :class:`XConv2d`."""

    _dims = 1
    _dense_cls = nn.Conv1d


class XConv2d(_XConvNd):
    """Expander-sparse ``nn.Conv2d``: each output channel reads ``degree`` input channels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
            padding_mode: as ``nn.Conv2d`` (no ``groups``: grouped sources are not converted).
        degree: inputs per output D; or give ``compress`` (D = C_in // compress).
        compress: target compression C >= 1.
        mixing: k, blocks reading each input (G = k * C_in / D); 1 = shuffle + grouped conv.
        graph: construction name (``random``, ``cayley``, ``grouped``, ``exact``) or a
            prebuilt :class:`~xsurgery.graphs.BipartiteGraph`.
        seed: seed of the graph construction.
        blocks: explicit G (overrides ``mixing``).
        execution: ``auto``, ``gather`` or ``masked``.
    """

    _dims = 2
    _dense_cls = nn.Conv2d


class XConv3d(_XConvNd):
    """Expander-sparse ``nn.Conv3d`` on ``[N, C, T, H, W]``; arguments as :class:`XConv2d`."""

    _dims = 3
    _dense_cls = nn.Conv3d


X_CONVS: dict[type[nn.Module], type[_XConvNd]] = {nn.Conv1d: XConv1d, nn.Conv2d: XConv2d, nn.Conv3d: XConv3d}
X_LAYERS = (XConv1d, XConv2d, XConv3d)  # extended with XLinear below


class XLinear(_XBase):
    """Expander-sparse ``nn.Linear`` on inputs of any leading shape.

    Arguments as :class:`XConv2d` (with ``in_features``/``out_features``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        degree: int | None = None,
        compress: float | None = None,
        mixing: int = 2,
        graph: str | BipartiteGraph = "random",
        seed: int = 0,
        blocks: int | None = None,
        execution: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_graph(in_features, out_features, degree, compress, mixing, graph, seed, blocks, execution)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, self.degree, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if device is not None:
            self.index = self.index.to(device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming normal, ReLU gain) with fan_in = D; the bias as nn.Linear's."""
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            bound = 1 / math.sqrt(self.degree)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        execution = self.resolved_execution()
        if execution == "masked" and (w := self._cached_dense(x)) is not None:
            return F.linear(x, w, self.bias)
        return x_linear(x, self.weight, self.index, self.bias, blocks=self.blocks,
                        execution=execution, in_features=self.in_features, skip_gather=self._identity)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        return f"{s}, {_graph_repr(self)}"

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        compress: float | None = None,
        degree: int | None = None,
        mixing: int = 2,
        graph: str | BipartiteGraph = "random",
        seed: int = 0,
        blocks: int | None = None,
        init: str = "kaiming",
        execution: str = "auto",
    ) -> XLinear:
        """Build from a dense ``nn.Linear`` (or transformers' ``Conv1D``, a linear whose weight is
        stored ``[in, out]``); ``init`` as :meth:`XConv2d.from_dense`."""
        if is_conv1d_linear(linear):
            cin, cout = linear.weight.shape
            weight_oi = linear.weight.t()
        elif isinstance(linear, nn.Linear):
            cin, cout, weight_oi = linear.in_features, linear.out_features, linear.weight
        else:
            raise ValueError("XLinear.from_dense needs an nn.Linear or a transformers Conv1D")
        _check_init(init)
        bias = getattr(linear, "bias", None)
        layer = cls(
            cin, cout, bias is not None, degree=degree,
            compress=compress, mixing=mixing, graph=graph, seed=seed, blocks=blocks,
            execution=execution, device=linear.weight.device, dtype=linear.weight.dtype,
        )
        if init == "keep":
            _keep_weights(layer, weight_oi, bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent plain ``nn.Linear``."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        _copy_dense(self, lin)
        return lin


X_LAYERS = (*X_LAYERS, XLinear)  # every X-layer class: isinstance checks use this

INITS = ("kaiming", "keep")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; use one of {INITS}")


def is_conv1d_linear(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): ``y = x @ W + b`` with ``W`` stored ``[in, out]``.

    Recognised by class name and module path so that transformers is never imported here.
    """
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)


@torch.no_grad()
def _keep_weights(layer: _XBase, dense, bias: torch.Tensor | None = None) -> None:
    """Copy the kept connections of ``dense`` (a module, or its ``[out, in, ...]`` weight)."""
    if isinstance(dense, nn.Module):
        dense, bias = dense.weight, dense.bias
    rows = layer.index.view(layer.blocks, 1, layer.degree)
    rows = rows.expand(layer.blocks, layer.out_features // layer.blocks, layer.degree)
    rows = rows.reshape(layer.out_features, layer.degree)
    w = dense
    rows = rows.view(*rows.shape, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
    layer.weight.copy_(w.gather(1, rows))
    if layer.bias is not None:
        layer.bias.copy_(bias)


@torch.no_grad()
def _copy_dense(layer: _XBase, dense: nn.Module) -> None:
    dense.weight.copy_(dense_weight(layer.weight, layer.index, layer.in_features, layer.blocks))
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)

