"""Connectivity of converted models: one layer's bipartite graph, and how many inputs each
output reaches through the network (the sensitivity depth of Theorem 3.1), against the grouped
baseline with the same degree (``xsurgery graph``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..graphs import BipartiteGraph, build_graph
from ..layers import X_LAYERS

__all__ = ["ReachRow", "grouped_baseline", "main_path", "reach_rows"]


@dataclass
class ReachRow:
    """Inputs of the path's first layer that outputs of layer ``depth`` reach (mean and min over
    the outputs), for the converted graphs and for the grouped baseline."""

    depth: int
    layer: str
    in_channels: int
    out_channels: int
    degree: int
    blocks: int
    inputs: int  # the first layer's input channels
    reach_mean: float
    reach_min: int
    grouped_mean: float | None
    grouped_min: int | None


def x_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, X_LAYERS)]


def main_path(model: nn.Module) -> list[tuple[str, BipartiteGraph]]:
    """The converted layers in network order, each kept when it reads as many channels as the
    previous kept one writes (the main path through residual blocks; shortcuts only add reach)."""
    path: list[tuple[str, BipartiteGraph]] = []
    for name, m in x_layers(model):
        if not path or m.graph.in_features == path[-1][1].out_features:
            path.append((name, m.graph))
    return path


def grouped_baseline(g: BipartiteGraph) -> BipartiteGraph | None:
    """The grouped convolution with the same degree (C_in / D groups), or None when the shape has none."""
    if g.in_features % g.degree:
        return None
    blocks = g.in_features // g.degree
    if g.out_features % blocks:
        return None
    return build_graph(g.in_features, g.out_features, g.degree, blocks, construction="grouped")


def _step(reach: torch.Tensor | None, g: BipartiteGraph) -> torch.Tensor:
    m = g.mask().to(torch.float32)
    return m if reach is None else ((m @ reach) > 0).to(torch.float32)


def reach_rows(path: list[tuple[str, BipartiteGraph]]) -> list[ReachRow]:
    """One row per depth along ``path`` (see :func:`main_path`)."""
    rows: list[ReachRow] = []
    reach = base = None
    base_ok = True
    for depth, (name, g) in enumerate(path, start=1):
        reach = _step(reach, g)
        counts = reach.sum(dim=1)
        b = grouped_baseline(g) if base_ok else None
        base_ok = b is not None
        base = _step(base, b) if b is not None else None
        bc = base.sum(dim=1) if base is not None else None
        rows.append(ReachRow(depth, name, g.in_features, g.out_features, g.degree, g.blocks, path[0][1].in_features,
                             float(counts.mean()), int(counts.min()),
                             None if bc is None else float(bc.mean()), None if bc is None else int(bc.min())))
    return rows
