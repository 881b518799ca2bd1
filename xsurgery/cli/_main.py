"""The ``xsurgery`` command: a thin layer over the Python API.

Subcommands: ``convert``, ``plan``, ``report``, ``graph`` (here) and ``export``, ``train``,
``bench`` (registered by their stage modules through ``add_cli``). A mistake a user can fix
prints one line and exits 2; ``--debug`` shows the traceback. Every command takes ``--quiet``
and writes JSON the same way (``--json [FILE]``, see :func:`xsurgery.cli._args.add_output_args`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from .._version import __version__
from ..errors import UserError
from ._args import (
    add_model_args,
    add_output_args,
    add_quiet_arg,
    add_surgery_args,
    budget_kwargs,
    example_arg,
    load_options,
    surgery_kwargs,
)
from ._bench import add_cli as bench_cli
from ._export import add_cli as export_cli
from ._sweep import add_cli as sweep_cli
from ._train import add_cli as train_cli

__all__ = ["main"]

MAX_ERROR = 1000  # characters of an error line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        from .._util.text import safe_text

        self.exit(2, f"xsurgery: error: {safe_text(message, MAX_ERROR)} (see `{self.prog} --help`)\n")


def _emit_json(data: Any, target: str | None, force: bool = False) -> None:
    from ..analysis import emit_json

    emit_json(data, target, force)


def _status(args: argparse.Namespace, text: str) -> None:
    """A status line ("wrote X"): on stdout after a table, on stderr when stdout carries data."""
    if getattr(args, "quiet", False):
        return
    data = args.json == "-" or getattr(args, "fmt", "table") != "table"
    print(text, file=sys.stderr if data else sys.stdout)


def _render(rep, args: argparse.Namespace) -> None:
    if args.json == "-":
        return  # stdout carries the JSON
    rep.render(max_rows=args.max_rows, show_all=args.show_all, width=args.width, fmt=args.fmt)


def _plot_report(rep, args: argparse.Namespace) -> None:
    if getattr(args, "plot", None):
        from ..analysis import plot_report

        plot_report(rep, args.plot, force=args.force)
        _status(args, f"wrote {args.plot}")


def _check_outputs(args: argparse.Namespace, *paths: str | None) -> None:
    """Every output is checked before any work: no overwrite without --force."""
    from .._util.io import check_output

    for path in paths:
        if path and path != "-":
            check_output(path, force=args.force)
    if len({p for p in paths if p and p != "-"}) < len([p for p in paths if p and p != "-"]):
        raise UserError("-o and --json name the same file; give them different names")


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import check_save_target, save
    from ..surgery import convert

    save_format = "hf" if args.fmt == "hf" else "xs"
    if save_format == "hf":
        if not args.output:
            raise UserError("--format hf writes a Hugging Face folder: name it with -o FOLDER")
        args.fmt = "table"
        check_save_target(args.output, format="hf", force=args.force)
    elif args.output and args.output.endswith(("/", os.sep)):
        raise UserError(f"-o {args.output} names a folder: add --format hf to write a Hugging Face folder, "
                        f"or name an .xs file")
    _check_outputs(args, args.output if save_format == "xs" else None, args.json, args.plot)
    if save_format == "hf" and args.output in (args.json, args.plot):
        raise UserError("-o and --json/--plot name the same path; give them different names")
    calibration = None
    if args.calibration is not None:
        if args.init != "project":
            raise UserError("--calibration is used by --init project only")
        from ..train import load_recipe

        calibration = load_recipe(args.calibration, [f"calibration_batches={args.calibration_batches}"]
                                  if args.calibration_batches is not None else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, rep = convert(args.model, input_size=args.input_size, example_inputs=example_arg(args),
                             model_kwargs=args.model_kwargs, pretrained=args.pretrained, check=not args.no_check,
                             allow_none=args.allow_none, weights=args.weights, calibration=calibration,
                             **surgery_kwargs(args), **budget_kwargs(args))
    for w in caught:
        if "calibrat" in str(w.message):  # ours: one plain line
            print(f"xsurgery: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    data = {**rep.to_dict(), **({"budget": rep.budget} if rep.budget else {})}
    _emit_json(data, args.json, args.force)
    if rep.budget and args.fmt == "json" and args.json != "-":
        print(json.dumps(data, indent=2))
    else:
        _render(rep, args)
    if rep.budget and args.json != "-" and args.fmt in ("table", "markdown"):
        import shutil
        import textwrap

        width = args.width or (shutil.get_terminal_size().columns if sys.stdout.isatty() else 80)
        print(textwrap.fill(_budget_line(rep.budget), width=max(width, 40), subsequent_indent="  "))
    _plot_report(rep, args)
    if args.output:
        save(model, args.output, force=args.force, format=save_format)
        _status(args, f"wrote {args.output}")
    return 0


def _budget_line(b: dict[str, Any]) -> str:
    """``budget: MACs 1.20 G target, 1.19 G reached (0.99x) at compress 2.3``."""
    from .._util.table import human

    what = {"macs": "MACs", "params": "params"}[b["metric"]] + (f" of {b['match']}" if b["match"] else "")
    return (f"budget: {what} {human(b['target'], spaced=True)} target, {human(b['reached'], spaced=True)} "
            f"reached ({b['ratio']:.2f}x) at compress {b['compress']:g}")


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..analysis import cached_spectral_gap
    from ..checkpoint import is_checkpoint_path
    from ..models import create_model
    from ..surgery import SurgerySpec, decide, load_plan

    if is_checkpoint_path(args.model):
        raise UserError("plan takes a model name, not a checkpoint")
    _check_outputs(args, args.json)
    model = create_model(args.model, args.model_kwargs, args.pretrained)
    kw = surgery_kwargs(args)
    kw["plan"] = load_plan(kw["plan"])
    for key in ("layers", "include", "exclude"):
        kw[key] = tuple(kw[key])
    from ..models import resolve

    try:  # the example the convert would run: its probe (weights read directly, raw-input stems) decides alike
        example = resolve(model, example_arg(args), getattr(args, "input_size", None))
    except UserError:
        example = None
    decisions, trace = decide(model, SurgerySpec.from_config(kw.pop("config"), **kw), example)
    rows = []
    for d in decisions:
        row = d.to_dict()
        row["spectral_gap"] = cached_spectral_gap(d._graph) if d._graph is not None else None
        rows.append(row)
    data = {"model": args.model, "method": "fx" if trace.ok else "module-swap", "layers": rows}
    _emit_json(data, args.json, args.force)
    if args.json == "-":
        return 0
    from ..analysis import Grid, emit_grid

    cells = []
    for r in rows:
        kernel = "x".join(map(str, r["kernel"])) if r["kernel"] else ""
        kind = r["kind"] if not kernel else kernel if r["kind"] in ("conv", "pointwise") else f"{r['kind']} {kernel}"
        gap = f"{r['spectral_gap']:.2f}" if r["spectral_gap"] is not None else ""
        cells.append([r["name"], kind, f"{r['in_channels']}→{r['out_channels']}", "yes" if r["converted"] else "no",
                      f"{r['degree']}/{r['blocks']}" if r["degree"] else "", r["graph"] or "", gap,
                      r["reason"] or r["note"] or ""])
    n = sum(r["converted"] for r in rows)
    how = "torch.fx trace" if trace.ok else "module order: fx could not trace, " + str(trace.error)
    why: dict[str, list[str]] = {}
    for r in rows:
        if r["reason"] or r["note"]:
            why.setdefault(r["reason"] or r["note"], []).append(r["name"])
    graphs = {r["graph"] for r in rows if r["graph"]}
    moved = {"reason / note": [f"{k}: {', '.join(v[:4])}" + (f" and {len(v) - 4} more" if len(v) > 4 else "")
                               for k, v in why.items()],
             **({"graph": [f"graph: {graphs.pop()} (every converted layer)"]} if len(graphs) == 1 else {})}
    notes = [f"{n} of {len(rows)} conv/linear layers would be converted ({how})"]
    if not args.show_all and len(cells) > (args.max_rows or 40):
        from .._util.table import collapse_rows

        groups = collapse_rows(cells, lambda c: tuple(c[1:6] + c[7:]), lambda c: c[0])  # all but the gap
        cells = []
        for label, members in groups:
            gaps = sorted({m[6] for m in members if m[6]})
            gap = gaps[0] if len(gaps) == 1 else f"{gaps[0]}-{gaps[-1]}" if gaps else ""
            cells.append([label + (f"  x{len(members)}" if len(members) > 1 else ""), *members[0][1:6], gap,
                          members[0][7]])
        notes.append("xN: N identical layers in one row (--all: every layer)")
    grid = Grid(["layer", "kind", "C_in→C_out", "convert", "D/G", "graph", "gap", "reason / note"],
                cells, frozenset({"C_in→C_out", "D/G", "gap"}), ["green" if c[3] == "yes" else None for c in cells],
                f"xsurgery plan: {args.model}", notes)
    emit_grid(grid, args.fmt, width=args.width, data=data, moved=moved,
              drop_order=("graph", "reason / note", "C_in→C_out", "gap", "D/G"))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..analysis import report
    from ..checkpoint import resolve_model
    from ..models import resolve

    _check_outputs(args, args.json, args.plot)
    if str(args.model).lower().endswith(".onnx"):
        from ..analysis import onnx_report

        rep = onnx_report(args.model)
    else:
        model = resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model,
                              **load_options(args))
        rep = report(model, name=args.model, example_inputs=resolve(model, example_arg(args), args.input_size))
    _emit_json(rep.to_dict(), args.json, args.force)
    _render(rep, args)
    _plot_report(rep, args)
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from ._graph import graph_command

    _check_outputs(args, args.json, args.plot)
    return graph_command(args)


def _add_plot_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--plot", default=None, metavar="FILE.png", help=f"{what} (needs matplotlib: pip install xsurgery[plot])")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xsurgery", description="Make torchvision/timm models expander-sparse before training.")
    parser.add_argument("--version", action="version", version=f"xsurgery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", help="rewrite a model with X-layers and print the params/FLOPs report")
    add_model_args(p)
    add_surgery_args(p, budget=True)
    p.add_argument("-o", "--output", default=None, metavar="OUT.xs",
                   help="write the converted model (safetensors; with --format hf a Hugging Face folder)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="dense weights loaded before the surgery: safetensors, a dense .xs checkpoint, or a torch "
                        "file of tensors only (read with weights_only=True)")
    p.add_argument("--calibration", default=None, metavar="RECIPE",
                   help="--init project: fit on batches of this training recipe's training split (default: the "
                        "example input, with a warning)")
    p.add_argument("--calibration-batches", type=int, default=None, metavar="N",
                   help="batches of the recipe to calibrate on (default: its calibration_batches, 8)")
    p.add_argument("--allow-none", action="store_true", help="accept a surgery that converts no layer")
    p.add_argument("--no-check", action="store_true",
                   help="skip running original and converted on the example to compare their outputs")
    add_output_args(p, save_formats=True)
    _add_plot_arg(p, "per-layer params, MACs and spectral gap as a picture")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("plan", help="print what convert would do, without converting")
    add_model_args(p)
    add_surgery_args(p)
    add_output_args(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("report", help="params/MACs/FLOPs report of any model, checkpoint or exported .onnx file")
    add_model_args(p, checkpoint_ok=True)
    add_output_args(p)
    _add_plot_arg(p, "per-layer params, MACs and spectral gap as a picture")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("graph", help="connectivity of a converted layer, or inputs reached through the network")
    add_model_args(p, checkpoint_ok=True)
    add_surgery_args(p)
    p.add_argument("--layer", default=None, metavar="NAME", help="one X-layer (default: the whole network)")
    add_output_args(p)
    _add_plot_arg(p, "the layer's biadjacency, or the reach per depth against the grouped baseline")
    p.set_defaults(func=_cmd_graph)

    for add_cli in (export_cli, train_cli, bench_cli, sweep_cli):
        add_cli(sub)
    for p in sub.choices.values():  # --quiet everywhere, stage modules' commands included
        if not any("--quiet" in a.option_strings for a in p._actions):
            add_quiet_arg(p)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    return parser


def _seed(args: argparse.Namespace) -> None:
    """Random weights (a model built from its name, X-layer initialisation) come from the
    global RNG: seed it from --seed so the same command writes the same bytes."""
    import torch

    seed = getattr(args, "seed", None)
    torch.manual_seed(seed if isinstance(seed, int) else 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .._util.io import signals_raise
    from .._util.progress import set_quiet

    set_quiet(bool(getattr(args, "quiet", False)))

    try:
        with signals_raise():
            _seed(args)
            return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        from .._util.text import safe_text

        # one line whatever the message holds: names and values read from files are escaped
        print(f"xsurgery: error: {safe_text(str(exc), MAX_ERROR)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xsurgery: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        from .._util.memory import is_out_of_memory

        if args.debug or not is_out_of_memory(exc):
            raise
        print(f"xsurgery: error: out of memory ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}); "
              f"use a smaller input size, batch or model", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
