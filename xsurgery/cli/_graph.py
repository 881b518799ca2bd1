"""``xsurgery graph``: a converted layer's graph (``--layer``), or the inputs each output
reaches through the network against the grouped baseline."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from torch import nn

from ..errors import UserError


def _model(args: argparse.Namespace) -> nn.Module:
    from ..checkpoint import is_checkpoint_path, resolve_model
    from ._args import example_arg, load_options, surgery_kwargs

    if is_checkpoint_path(args.model):
        return resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model,
                             **load_options(args))
    from ..surgery import convert

    model, _ = convert(args.model, input_size=args.input_size, example_inputs=example_arg(args),
                       model_kwargs=args.model_kwargs, pretrained=args.pretrained, check=False,
                       **surgery_kwargs(args))
    return model


def graph_command(args: argparse.Namespace) -> int:
    """``xsurgery graph``: a layer's graph (``--layer``) or the reach table, as text/JSON/picture."""
    from ..analysis import Grid, emit_grid, emit_json, main_path, reach_rows, x_layers

    model = _model(args)
    layers = dict(x_layers(model))
    if not layers:
        raise UserError(f"{args.model} has no converted layer; convert it first (or give surgery options)")
    data: dict[str, Any]
    if args.layer is not None:
        if args.layer not in layers:
            near = ", ".join(list(layers)[:5])
            raise UserError(f"no converted layer {args.layer!r}; converted layers include {near}")
        from ..analysis import cached_spectral_gap

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
            from ..analysis import plot_layer_graph

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
            from ..analysis import plot_reach

            plot_reach(rows, args.plot, title=str(args.model), force=args.force)
    emit_json(data, args.json, args.force)
    if args.json != "-":
        emit_grid(grid, args.fmt, width=args.width, data=data, drop_order=("C_in→C_out", "D/G"))
    if args.plot and not getattr(args, "quiet", False):
        import sys

        print(f"wrote {args.plot}", file=sys.stderr if args.fmt != "table" or args.json == "-" else sys.stdout)
    return 0
