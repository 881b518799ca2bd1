"""Functional X-layers and their executions.

An execution computes one X-layer from its compact weight and flat index. Two are
registered; both compute the same function (masked is the reference in tests):

* ``gather``: ``conv2d(x.index_select(1, index), weight, groups=G)`` (a grouped conv over the
  k * C_in gathered channels);
* ``masked``: scatter the compact weight into the dense ``[C_out, C_in, kh, kw]`` weight and run
  the plain conv; faster where G is large.

``execution="auto"`` picks per layer with :func:`auto_execution`. A new execution is one
:func:`register_execution` entry (a conv and a linear function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "EXECUTIONS",
    "Execution",
    "auto_execution",
    "conv_nd",
    "dense_weight",
    "list_executions",
    "register_execution",
    "x_conv1d",
    "x_conv2d",
    "x_conv3d",
    "x_convnd",
    "x_linear",
]

# Gather (a grouped conv over the k*C_in gathered channels) wins on CPU when every block has
# enough outputs to amortise its share of the gather; below that, the masked-dense conv does.
# Thresholds from tools/bench_layers.py --sweep (366 layer shapes x block counts, torch eager
# and training step; docs/performance.md): they cut the time lost to the wrong choice from
# 90 to about 20-26 dense-layer units against the earlier "blocks <= 64" rule. At mixing 1
# (the default: each input read once, the gather a permutation of the input) gather won 95
# of 103 cases in inference and 93 of 103 in the training step, whatever the outputs per block
# (losing by at most 1.12x and 1.28x), so mixing-1 layers always gather; over all 422 cases
# that cuts the time lost from 35 to 30 (inference) and 32 to 26 (training) dense-layer units.
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
    if blocks * degree == in_features:
        return "gather"  # mixing 1: a permutation (or none) and G GEMMs; see MIN_OUTPUTS_PER_BLOCK
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
    """``F.conv{dims}d`` with ``nn.ConvNd``'s padding modes (``padding`` is F.pad's 2N-tuple
    for modes other than ``zeros``)."""
    if padding_mode != "zeros":
        x = F.pad(x, padding, mode=padding_mode)
        padding = 0
    return _CONV_FN[dims](x, weight, bias, stride, padding, dilation, groups)


@dataclass(frozen=True)
class Execution:
    """How an X-layer runs: ``conv(x, weight, index, bias, stride, padding, dilation, blocks,
    padding_mode, skip_gather, in_features, dims)`` and ``linear(x, weight, index, bias, blocks,
    skip_gather, in_features)``."""

    name: str
    conv: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]


_EXECUTIONS: dict[str, Execution] = {}


def register_execution(execution: Execution) -> Execution:
    """Add an execution; a duplicate name raises."""
    if execution.name in _EXECUTIONS or execution.name == "auto":
        raise ValueError(f"execution {execution.name!r} is already registered")
    _EXECUTIONS[execution.name] = execution
    return execution


def list_executions() -> list[str]:
    """``auto`` and the registered executions."""
    return ["auto", *_EXECUTIONS]


def _execution(name: str) -> Execution:
    if name not in _EXECUTIONS:
        raise ValueError(f"unknown execution {name!r}; use one of {tuple(list_executions())}")
    return _EXECUTIONS[name]


def _gather_conv(x, weight, index, bias, stride, padding, dilation, blocks, padding_mode, skip_gather, in_features,
                 dims):
    if not skip_gather:
        x = x.index_select(1, index)
    return conv_nd(x, weight, bias, stride, padding, dilation, blocks, padding_mode, dims)


def _masked_conv(x, weight, index, bias, stride, padding, dilation, blocks, padding_mode, skip_gather, in_features,
                 dims):
    w = dense_weight(weight, index, in_features or x.shape[1], blocks)
    return conv_nd(x, w, bias, stride, padding, dilation, 1, padding_mode, dims)


def _gather_linear(x, weight, index, bias, blocks, skip_gather, in_features):
    out_features, degree = weight.shape
    lead = x.shape[:-1]
    if not skip_gather:
        x = x.index_select(-1, index)
    xg = x.reshape(-1, blocks, degree).transpose(0, 1)  # [G, M, D]
    w = weight.view(blocks, out_features // blocks, degree).transpose(1, 2)  # [G, D, O/G]
    y = torch.bmm(xg, w).transpose(0, 1).reshape(*lead, out_features)
    return y if bias is None else y + bias


def _masked_linear(x, weight, index, bias, blocks, skip_gather, in_features):
    return F.linear(x, dense_weight(weight, index, in_features or x.shape[-1], blocks), bias)


register_execution(Execution("gather", _gather_conv, _gather_linear))
register_execution(Execution("masked", _masked_conv, _masked_linear))
EXECUTIONS = tuple(list_executions())


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
        execution: a registered execution (``gather`` or ``masked``: same math).
        padding_mode: as ``nn.ConvNd``; for non-``zeros`` modes ``padding`` is the F.pad
            2N-tuple.
        skip_gather: the index is the identity, so ``gather`` may skip ``index_select``.
        in_features: C_in for ``masked`` (default ``x.shape[1]``; a constant traces better).
        dims: spatial dims N (default ``weight.dim() - 2``; give it where ``weight`` is a
            tracing proxy).
    """
    dims = dims or weight.dim() - 2
    return _execution(execution).conv(x, weight, index, bias, stride, padding, dilation, blocks, padding_mode,
                                      skip_gather, in_features, dims)


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
    return _execution(execution).linear(x, weight, index, bias, blocks, skip_gather, in_features)
