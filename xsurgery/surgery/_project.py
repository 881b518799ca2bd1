"""``init="project"``: an activation-aware projection of dense weights onto the X pattern.

Block g of a converted layer has ``B = C_out / G`` outputs that all read the D inputs
``index[g]``. On calibration batches, let ``X_g`` hold one row per output position with the
block's kept inputs (a linear layer: the input rows' D features; a conv: the unfolded patch of
the D channels, ``D * prod(kernel)`` values in the compact weight's order, with the layer's
stride, padding, padding mode and dilation) and ``Y_g`` the dense layer's outputs of the block
without bias. The block's compact weight is the ridge least-squares fit

    W_g = argmin_W ||X_g W^T - Y_g||^2 + lam_g ||W||^2,   i.e.   (X_g^T X_g + lam_g I) W_g^T = X_g^T Y_g,

with ``lam_g = ridge * mean(diag(X_g^T X_g))`` (scale-free; ``ridge`` default 1e-3). Only the
Gram matrix ``X_g^T X_g`` and ``X_g^T Y_g`` are accumulated over the batches (float64), so memory
is bounded by the blocks' sizes, not by the data; layers whose statistics would not fit in a
quarter of the available memory are collected in several passes. The dense bias is kept. A block
whose inputs were all zero on the data keeps the dense weights of its connections (``keep``).

Which inputs: every layer is fitted to the **dense** model's own inputs and outputs, collected
from the dense model in one pass per batch (not to what the already projected layers before it
would feed it). The report's per-layer error is measured the same way: the relative output error
``||Y_x - Y_dense|| / ||Y_dense||`` of the layer alone on the dense inputs (bias included), for
``keep`` and for the projection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util.memory import available_bytes
from ..errors import UserError
from ..layers import X_LAYERS, is_conv1d_linear

__all__ = ["DEFAULT_RIDGE", "calibration_batches", "layer_rows", "project", "ridge_solve"]

DEFAULT_RIDGE = 1e-3


# ------------------------------------------------------------------------------ data


def _one_batch(batch: Any) -> tuple[tuple, dict]:
    """A batch as ``(args, kwargs)``: a tensor, a dict of keyword inputs, ``(args, kwargs)``, or a
    tuple/list whose first item is the input (a DataLoader's ``(x, y)``: the labels are ignored)."""
    from ..models import normalize

    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 2 and isinstance(batch[0], tuple) and isinstance(batch[1], dict):
            return tuple(batch[0]), dict(batch[1])
        return normalize(batch[0])
    return normalize(batch)


def calibration_batches(calibration: Any, example: Any) -> tuple[list[tuple[tuple, dict]], bool]:
    """The batches to calibrate on and whether they are the example input (no data given).

    ``calibration``: None (the example input, with a warning), a tensor (one batch), an object
    with a ``calibration_data()`` method (a training :class:`~xsurgery.train.Recipe`: batches
    from its training split), or an iterable of batches (see :func:`_one_batch`).
    """
    if calibration is None:
        if example is None:
            raise UserError("init='project' needs calibration data: pass calibration= (a tensor, batches or a "
                            "recipe; CLI --calibration RECIPE) or an example input (--input)")
        warnings.warn("init='project' calibrates on the example input only; pass calibration= (CLI --calibration "
                      "RECIPE) for a fit on real data", stacklevel=3)
        return [example], True
    if isinstance(calibration, str):
        raise UserError("calibration= takes a tensor, an iterable of batches or a recipe object "
                        "(xsurgery.train.load_recipe(path)); the CLI's --calibration takes a recipe path")
    if callable(getattr(calibration, "calibration_data", None)):
        calibration = calibration.calibration_data()
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    try:
        batches = [_one_batch(b) for b in calibration]
    except TypeError:
        raise UserError(f"calibration= must be a tensor, an iterable of batches or a recipe, got "
                        f"{type(calibration).__name__}") from None
    if not batches:
        raise UserError("calibration= holds no batch; give at least one")
    return batches, False


# ---------------------------------------------------------------------------- rows


def layer_rows(layer: nn.Module, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[M, D * prod(kernel)]`` a dense conv/linear layer multiplies its weight with, for
    the input channels ``channels`` (None: all): the input's features for a linear layer, the
    unfolded patches for a conv (1d/2d/3d; its stride, padding, padding mode and dilation)."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        if channels is not None:
            x = x.index_select(1, channels.to(x.device))
        dims = len(layer.kernel_size)
        pad = layer._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad) if layer.padding_mode == "zeros" else F.pad(x, pad, mode=layer.padding_mode)
        for i in range(dims):
            k, s, d = layer.kernel_size[i], layer.stride[i], layer.dilation[i]
            x = x.unfold(2 + i, d * (k - 1) + 1, s)  # a window of the dilated extent, appended last
            if d > 1:
                x = x[(..., slice(None, None, d))]
        # [N, D, *out, *kernel] -> [N, *out, D, *kernel] -> rows
        x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
        return x.reshape(-1, math.prod(x.shape[1 + dims:]))
    rows = x.reshape(-1, x.shape[-1])
    return rows if channels is None else rows.index_select(1, channels.to(x.device))


def _outputs(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's outputs as rows ``[M, C_out]`` without the bias."""
    rows = y.movedim(1, -1).reshape(-1, y.shape[1]) if isinstance(layer, nn.modules.conv._ConvNd) \
        else y.reshape(-1, y.shape[-1])
    bias = getattr(layer, "bias", None)
    return rows - bias if bias is not None else rows


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    """``W`` (``[outputs, P]``) minimising ``||X W^T - Y||^2 + lam ||W||^2`` from ``gram = X^T X``
    (``[P, P]``) and ``cross = X^T Y`` (``[P, outputs]``): ``(gram + lam I) W^T = cross``."""
    a = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if lam > 0:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(cross, chol).T
    # no ridge (or not positive definite in floating point): the minimum-norm least-squares solution
    return (torch.linalg.pinv(a, hermitian=True) @ cross).T


# ------------------------------------------------------------------------ statistics


@dataclass
class _Stats:
    """Sums over the calibration rows of one layer: per block ``X_g^T X_g``, ``X_g^T Y_g`` and
    ``||Y_g||^2``; per output the sum of ``Y``; the row count."""

    layer: nn.Module
    index: torch.Tensor  # [G, D]
    gram: list[torch.Tensor] = field(default_factory=list)
    cross: list[torch.Tensor] = field(default_factory=list)
    yy: list[float] = field(default_factory=list)
    ysum: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        blocks = self.index.shape[0]
        out = _outputs(self.layer, y).double()
        per = out.shape[1] // blocks
        for g in range(blocks):
            xs = layer_rows(self.layer, x, self.index[g]).double()
            yg = out[:, g * per:(g + 1) * per]
            if len(self.gram) <= g:
                self.gram.append(xs.T @ xs)
                self.cross.append(xs.T @ yg)
                self.yy.append(float((yg * yg).sum()))
            else:
                self.gram[g] += xs.T @ xs
                self.cross[g] += xs.T @ yg
                self.yy[g] += float((yg * yg).sum())
        s = out.sum(0)
        self.ysum = s if self.ysum is None else self.ysum + s
        self.rows += out.shape[0]


def _stat_bytes(x_layer: nn.Module) -> int:
    area = math.prod(getattr(x_layer, "kernel_size", (1,)))
    p = x_layer.degree * area
    per = x_layer.out_features // x_layer.blocks
    return 8 * x_layer.blocks * (p * p + p * per)


def _groups(names: Sequence[str], xmods: dict[str, nn.Module]) -> list[list[str]]:
    """Layers in passes whose statistics fit in a quarter of the memory available."""
    budget = max(available_bytes() // 4, 1 << 28)
    groups: list[list[str]] = [[]]
    used = 0
    for n in names:
        b = _stat_bytes(xmods[n])
        if groups[-1] and used + b > budget:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += b
    return groups


def _collect(dense: nn.Module, names: Sequence[str], xmods: dict[str, nn.Module],
             batches: Sequence[tuple[tuple, dict]]) -> dict[str, _Stats]:
    from ..models import call

    modules = dict(dense.named_modules())
    stats = {n: _Stats(modules[n], xmods[n].index.view(xmods[n].blocks, xmods[n].degree).to("cpu")) for n in names}
    hooks = []
    for n in names:
        def hook(module, inputs, output, s=stats[n]):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            s.index = s.index.to(inputs[0].device)
            s.add(inputs[0].detach(), output.detach())
        hooks.append(modules[n].register_forward_hook(hook))
    was = dense.training
    dense.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                call(dense, batch)
    finally:
        for h in hooks:
            h.remove()
        dense.train(was)
    return stats


def _dense_oi(layer: nn.Module) -> torch.Tensor:
    """The dense weight as ``[C_out, C_in, *kernel]`` (transformers' Conv1D stores ``[in, out]``)."""
    return layer.weight.t() if is_conv1d_linear(layer) else layer.weight


def _error_sq(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, yy: float) -> float:
    """``||X W^T - Y||^2`` from the sums: ``tr(W G W^T) - 2 tr(W C) + ||Y||^2``."""
    return float(((w @ gram) * w).sum() - 2 * (w * cross.T).sum() + yy)


@torch.no_grad()
def _fit(name: str, s: _Stats, x_layer: nn.Module, ridge: float) -> dict[str, Any]:
    blocks, degree = s.index.shape
    per = x_layer.out_features // blocks
    dense_w = _dense_oi(s.layer).detach().double()
    err_keep = err_proj = 0.0
    new = x_layer.weight.detach().double().clone()
    for g in range(blocks):
        gram, cross = s.gram[g], s.cross[g]
        rows = slice(g * per, (g + 1) * per)
        keep = dense_w[rows].index_select(1, s.index[g].to(dense_w.device)).reshape(per, -1).to(gram.device)
        err_keep += _error_sq(keep, gram, cross, s.yy[g])
        scale = float(gram.diagonal().mean())
        w = keep if scale <= 0 else ridge_solve(gram, cross, ridge * scale)
        err_proj += _error_sq(w, gram, cross, s.yy[g])
        new[rows] = w.reshape(new[rows].shape).to(new.device)
    x_layer.weight.copy_(new.to(x_layer.weight.dtype))
    bias = getattr(s.layer, "bias", None)
    norm = sum(s.yy)
    if bias is not None and s.ysum is not None:  # ||Y + b||^2 = ||Y||^2 + 2 b.sum(Y) + M ||b||^2
        b = bias.detach().double().to(s.ysum.device)
        norm += float(2 * (b * s.ysum).sum() + s.rows * (b * b).sum())
    norm = math.sqrt(max(norm, 0.0))

    def rel(e: float) -> float | None:
        return math.sqrt(max(e, 0.0)) / norm if norm > 0 else None

    return {"name": name, "rows": s.rows, "keep_error": rel(err_keep), "project_error": rel(err_proj)}


def project(dense: nn.Module, converted: nn.Module, names: Iterable[str], batches: Sequence[tuple[tuple, dict]],
            *, ridge: float = DEFAULT_RIDGE) -> list[dict[str, Any]]:
    """Fit the compact weights of ``converted``'s X-layers ``names`` to the dense layers of
    ``dense`` on ``batches`` (see the module docstring); returns one record per layer:
    ``name``, ``rows`` (calibration rows seen), ``keep_error`` and ``project_error`` (relative
    output errors of the layer on the dense inputs)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise UserError(f"ridge must be a number >= 0, got {ridge!r}")
    xmods = {n: m for n, m in converted.named_modules() if isinstance(m, X_LAYERS)}
    names = [n for n in names if n in xmods]
    out: dict[str, dict[str, Any]] = {}
    for group in _groups(names, xmods):
        stats = _collect(dense, group, xmods, batches)
        for n in group:
            s = stats[n]
            if not s.gram:
                out[n] = {"name": n, "rows": 0, "keep_error": None, "project_error": None}
                continue  # never ran on the data: keeps the dense weights of its connections
            out[n] = _fit(n, s, xmods[n], float(ridge))
            del stats[n]
    return [out[n] for n in names]
