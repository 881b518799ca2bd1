"""Connectivity of converted models: one layer's bipartite graph, and how many inputs each
output reaches through the network (the sensitivity depth of Theorem 3.1), against the grouped
baseline with the same degree (``xsurgery graph``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._errors import UserError
from .graphs import BipartiteGraph, build_graph
from .layers import X_LAYERS

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


def _model(args: argparse.Namespace) -> nn.Module:
    from ._args import example_arg, load_options, surgery_kwargs
    from .checkpoint import is_checkpoint_path, resolve_model

    if is_checkpoint_path(args.model):
        return resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model,
                             **load_options(args))
    from .surgery import convert

    model, _ = convert(args.model, input_size=args.input_size, example_inputs=example_arg(args),
                       model_kwargs=args.model_kwargs, pretrained=args.pretrained, check=False,
                       **surgery_kwargs(args))
    return model


def graph_command(args: argparse.Namespace) -> int:
    """``xsurgery graph``: a layer's graph (``--layer``) or the reach table, as text/JSON/picture."""
    from ._render import Grid, emit_grid, emit_json

    model = _model(args)
    layers = dict(x_layers(model))
    if not layers:
        raise UserError(f"{args.model} has no converted layer; convert it first (or give surgery options)")
    data: dict[str, Any]
    if args.layer is not None:
        if args.layer not in layers:
            near = ", ".join(list(layers)[:5])
            raise UserError(f"no converted layer {args.layer!r}; converted layers include {near}")
        from .analysis import cached_spectral_gap

        g = layers[args.layer].graph
        data = {"layer": args.layer, "in_features": g.in_features, "out_features": g.out_features,
                "degree": g.degree, "blocks": g.blocks, "graph": g.construction, "mixing": g.mixing,
                "spectral_gap": cached_spectral_gap(g), "index": g.index.tolist()}
        grid = Grid(["block", "outputs", "inputs read"],
                    [[str(b), f"{b * g.block_size}-{(b + 1) * g.block_size - 1}",
                      " ".join(map(str, sorted(g.index[b].tolist())))] for b in range(g.blocks)],
                    frozenset({"block", "outputs"}), title=f"{args.layer}: {g!r}",
                    notes=[f"spectral gap {data['spectral_gap']:.3f}; each input feeds {g.mixing:g} blocks"])
        if args.plot:
            from ._plot import plot_layer_graph

            plot_layer_graph(g, args.plot, title=args.layer, force=args.force)
    else:
        rows = reach_rows(main_path(model))
        data = {"model": args.model, "path": [asdict(r) for r in rows]}
        full = next((r.depth for r in rows if r.reach_min == r.inputs), None)
        grid = Grid(["depth", "layer", "C_in→C_out", "D/G", "reached", "grouped"],
                    [[str(r.depth), r.layer, f"{r.in_channels}→{r.out_channels}", f"{r.degree}/{r.blocks}",
                      f"{r.reach_mean:.0f}/{r.inputs}",
                      "" if r.grouped_mean is None else f"{r.grouped_mean:.0f}/{r.inputs}"] for r in rows],
                    frozenset({"depth", "C_in→C_out", "D/G", "reached", "grouped"}),
                    title=f"{args.model}: inputs of {rows[0].layer} reached per output, along the main path",
                    notes=[f"every output reaches every input after {full} converted layers (Theorem 3.1)"
                           if full else "no depth on this path reaches every input",
                           "grouped: the grouped convolution with the same degree (no mixing)"])
        data["sensitivity_depth"] = full
        if args.plot:
            from ._plot import plot_reach

            plot_reach(rows, args.plot, title=str(args.model), force=args.force)
    emit_json(data, args.json, args.force)
    if args.json != "-":
        emit_grid(grid, args.fmt, width=args.width, data=data, drop_order=("C_in→C_out", "D/G"))
    if args.plot and not getattr(args, "quiet", False):
        import sys

        print(f"wrote {args.plot}", file=sys.stderr if args.fmt != "table" or args.json == "-" else sys.stdout)
    return 0
