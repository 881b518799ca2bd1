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

from ._errors import UserError
from ._version import __version__

__all__ = ["main"]

STAGE_MODULES = ("export", "train", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"xsurgery: error: {message} (see `{self.prog} --help`)\n")


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object such as '{{\"num_classes\": 10}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object such as '{\"num_classes\": 10}'")
    return value


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser, *, checkpoint_ok: bool = False) -> None:
    """MODEL, --model-kwargs, --pretrained, --input-size (shared with stage modules)."""
    what = "model name, timm/<name>, pkg.module:factory" + (", or a .xs checkpoint" if checkpoint_ok else "")
    p.add_argument("model", help=what)
    p.add_argument("--model-kwargs", type=_json_arg, default=None, metavar="JSON", help="factory kwargs as JSON")
    p.add_argument("--pretrained", action="store_true", help="ask the library for pretrained weights")
    p.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                   help="H, H W or C H W for image models; the feature size / length when the model starts "
                        "with a Linear / Conv1d / Embedding (default: the model's own)")
    p.add_argument("--input", action="append", default=None, metavar="[NAME=]SHAPE[:DTYPE]", type=_input_arg,
                   help="an example input, repeatable: 1x128:int64, attention_mask=1x128:int64, 8x40 "
                        "(dtype default: the model's float dtype)")


def _input_arg(text: str):
    from ._inputs import parse_input_spec

    try:
        return parse_input_spec(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def example_arg(args: argparse.Namespace):
    """The ``--input`` specs, or None (then ``--input-size`` or the model's default)."""
    return args.input or None


def add_surgery_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("surgery")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--compress", type=_positive_float, default=None, metavar="C",
                     help="compression C: degree D = C_in // C (default 2)")
    how.add_argument("--degree", type=int, default=None, metavar="D", help="explicit degree D per output")
    g.add_argument("--mixing", type=int, default=2, metavar="K",
                   help="blocks reading each input: 1 = shuffle + grouped conv (fast), 2 = expander (default)")
    g.add_argument("--graph", default="random", help="random (default), cayley, grouped, exact")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--init", default="kaiming", help="kaiming (default) or keep (copy kept dense weights)")
    g.add_argument("--layers", nargs="+", default=["pointwise", "conv", "linear"],
                   help="kinds to convert: pointwise conv linear (default: all)")
    g.add_argument("--include", nargs="+", default=[], metavar="GLOB", help="convert these despite the defaults")
    g.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="never convert these")
    g.add_argument("--include-stem", action="store_true", help="convert the stem conv too")
    g.add_argument("--include-classifier", action="store_true", help="convert the classifier too")
    g.add_argument("--min-channels", type=int, default=0, metavar="N", help="skip layers with fewer input channels")
    g.add_argument("--plan", default=None, metavar="FILE", help="YAML/JSON per-pattern rules")
    g.add_argument("--execution", default="auto", help="auto (default), gather or masked")


def surgery_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "compress": args.compress, "degree": args.degree, "mixing": args.mixing, "graph": args.graph,
        "seed": args.seed, "init": args.init, "layers": args.layers, "include": args.include,
        "exclude": args.exclude, "include_stem": args.include_stem,
        "include_classifier": args.include_classifier, "min_channels": args.min_channels,
        "plan": args.plan, "execution": args.execution,
    }


def _emit_json(data: Any, target: str) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    if target == "-":
        print(text)
        return
    from .checkpoint import write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    write_atomic(target, write, force=True)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import save
    from .surgery import convert

    if args.output and not args.force:
        import os

        if os.path.exists(args.output):
            raise UserError(f"{args.output} exists; pass --force to overwrite it")
    model, rep = convert(args.model, input_size=args.input_size, example_inputs=example_arg(args),
                         model_kwargs=args.model_kwargs, pretrained=args.pretrained, check=not args.no_check,
                         **surgery_kwargs(args))
    if args.json:
        _emit_json(rep.to_dict(), args.json)
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
    from ._sources import create_model, is_checkpoint_path
    from .analysis import cached_spectral_gap
    from .surgery import SurgerySpec, decide, load_plan

    if is_checkpoint_path(args.model):
        raise UserError("plan takes a model name, not a checkpoint")
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
        _emit_json({"model": args.model, "method": "fx" if trace.ok else "module-swap", "layers": rows}, args.json)
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
    from ._sources import create_model
    from .analysis import report

    model = create_model(args.model, args.model_kwargs, args.pretrained)
    rep = report(model, name=args.model, example_inputs=resolve(model, example_arg(args), args.input_size))
    if args.json:
        _emit_json(rep.to_dict(), args.json)
    if args.json != "-":
        rep.render(max_rows=args.max_rows)
    return 0


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write JSON (to stdout, or to FILE)")
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
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--no-check", action="store_true",
                   help="skip running original and converted on the example to compare their outputs")
    _add_output_args(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("plan", help="print what convert would do, without converting")
    add_model_args(p)
    add_surgery_args(p)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"xsurgery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xsurgery: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
