"""The ``xsurgery`` command: a thin layer over the Python API.

Subcommands: ``convert``, ``plan``, ``report`` (here) and ``export``, ``train``, ``bench``
(registered by their stage modules through ``add_cli``). A mistake a user can fix prints
one line and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from ._args import add_model_args, add_surgery_args, example_arg, load_options, surgery_kwargs
from ._errors import UserError
from ._version import __version__

__all__ = ["main"]

STAGE_MODULES = ("export", "train", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"xsurgery: error: {message} (see `{self.prog} --help`)\n")


def _emit_json(data: Any, target: str, force: bool = False) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    if target == "-":
        print(text)
        return
    from ._io import write_text

    write_text(target, text + "\n", force=force)


def _check_outputs(args: argparse.Namespace, *paths: str | None) -> None:
    """Every output is checked before any work: no overwrite without --force."""
    from ._io import check_output

    for path in paths:
        if path and path != "-":
            check_output(path, force=args.force)
    if len({p for p in paths if p and p != "-"}) < len([p for p in paths if p and p != "-"]):
        raise UserError("-o and --json name the same file; give them different names")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import save
    from .surgery import convert

    _check_outputs(args, args.output, args.json)
    model, rep = convert(args.model, input_size=args.input_size, example_inputs=example_arg(args),
                         model_kwargs=args.model_kwargs, pretrained=args.pretrained, check=not args.no_check,
                         allow_none=args.allow_none, **surgery_kwargs(args))
    if args.json:
        _emit_json(rep.to_dict(), args.json, args.force)
    if args.json != "-":
        rep.render(max_rows=args.max_rows)
        if getattr(rep, "method", "fx") != "fx":
            print(f"note: torch.fx could not trace this model ({rep.trace_error}); layers were swapped by name")
    if args.output:
        save(model, args.output, force=args.force)
        if args.json != "-":
            print(f"wrote {args.output}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from ._sources import create_model
    from .analysis import cached_spectral_gap
    from .checkpoint import is_checkpoint_path
    from .surgery import SurgerySpec, decide, load_plan

    if is_checkpoint_path(args.model):
        raise UserError("plan takes a model name, not a checkpoint")
    _check_outputs(args, args.json)
    model = create_model(args.model, args.model_kwargs, args.pretrained)
    kw = surgery_kwargs(args)
    kw["plan"] = load_plan(kw["plan"])
    for key in ("layers", "include", "exclude"):
        kw[key] = tuple(kw[key])
    decisions, trace = decide(model, SurgerySpec(**kw))
    rows = []
    for d in decisions:
        row = d.to_dict()
        row["spectral_gap"] = cached_spectral_gap(d._graph) if d._graph is not None else None
        rows.append(row)
    if args.json:
        _emit_json({"model": args.model, "method": "fx" if trace.ok else "module-swap", "layers": rows}, args.json,
                   args.force)
        if args.json == "-":
            return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"xsurgery plan: {args.model}", show_lines=False)
    for col in ("layer", "kind", "C_in->C_out", "kernel", "convert", "D", "G", "graph", "gap", "reason / note"):
        table.add_column(col, justify="right" if col in ("D", "G", "gap") else "left")
    for r in rows:
        kernel = "x".join(map(str, r["kernel"])) if r["kernel"] else "-"
        gap = f"{r['spectral_gap']:.3f}" if r["spectral_gap"] is not None else "-"
        table.add_row(r["name"], r["kind"], f"{r['in_channels']}->{r['out_channels']}", kernel,
                      "yes" if r["converted"] else "no", str(r["degree"] or "-"), str(r["blocks"] or "-"),
                      r["graph"] or "-", gap, r["reason"] or r["note"] or "")
    console = Console()
    console.print(table)
    n = sum(r["converted"] for r in rows)
    console.print(f"{n} of {len(rows)} conv/linear layers would be converted "
                  f"({'torch.fx trace' if trace.ok else 'module order: fx could not trace, ' + str(trace.error)})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._inputs import resolve
    from .analysis import report
    from .checkpoint import resolve_model

    _check_outputs(args, args.json)
    model = resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model, **load_options(args))
    rep = report(model, name=args.model, example_inputs=resolve(model, example_arg(args), args.input_size))
    if args.json:
        _emit_json(rep.to_dict(), args.json, args.force)
    if args.json != "-":
        rep.render(max_rows=args.max_rows)
    return 0


def _add_output_args(p: argparse.ArgumentParser, force: bool = True) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write JSON (to stdout, or to FILE)")
    if force:
        p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--max-rows", type=int, default=None, metavar="N", help="collapse the table to N rows")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xsurgery", description="Make torchvision/timm models expander-sparse before training.")
    parser.add_argument("--version", action="version", version=f"xsurgery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", help="rewrite a model with X-layers and print the params/FLOPs report")
    add_model_args(p)
    add_surgery_args(p)
    p.add_argument("-o", "--output", default=None, metavar="OUT.xs", help="write the converted model (safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite OUT and the --json FILE")
    p.add_argument("--allow-none", action="store_true", help="accept a surgery that converts no layer")
    p.add_argument("--no-check", action="store_true",
                   help="skip running original and converted on the example to compare their outputs")
    _add_output_args(p, force=False)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("plan", help="print what convert would do, without converting")
    add_model_args(p)
    add_surgery_args(p)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite the --json FILE")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("report", help="params/MACs/FLOPs report of any model or checkpoint")
    add_model_args(p, checkpoint_ok=True)
    _add_output_args(p)
    p.set_defaults(func=_cmd_report)

    for name in STAGE_MODULES:
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ImportError:
            continue
        if hasattr(mod, "add_cli"):
            mod.add_cli(sub)
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
    from ._io import signals_raise

    try:
        with signals_raise():
            _seed(args)
            return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"xsurgery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xsurgery: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        from ._memory import is_out_of_memory

        if args.debug or not is_out_of_memory(exc):
            raise
        print(f"xsurgery: error: out of memory ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}); "
              f"use a smaller input size, batch or model", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
