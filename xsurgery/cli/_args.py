"""Command-line arguments shared by every subcommand (model, surgery, checkpoint loading).

Kept apart from :mod:`xsurgery.cli` so that stage modules (export, bench) can add their
subcommands without importing the CLI above them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UserError
from ..graphs import list_graphs
from ..layers import MIX_POINTS, SparsityConfig

__all__ = ["MAX_SEED", "MAX_THREADS", "add_model_args", "add_output_args", "add_quiet_arg", "add_surgery_args",
           "add_trust_args", "budget_kwargs", "example_arg", "load_options", "surgery_kwargs", "table_options"]


MAX_THREADS = 4096  # intra-op threads: far beyond any machine, far below what a runtime can start
MAX_SEED = 2**63 - 1  # torch's and numpy's generators take 64-bit seeds
MAX_KWARGS_DEPTH = 12
MAX_KWARGS_CHARS = 1 << 16


def _depth(value: Any, limit: int, depth: int = 0) -> bool:
    """True when ``value`` (parsed JSON) nests no deeper than ``limit``."""
    if depth > limit:
        return False
    if isinstance(value, dict):
        return all(_depth(v, limit, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth(v, limit, depth + 1) for v in value)
    return True


def _json_arg(text: str) -> dict[str, Any]:
    if len(text) > MAX_KWARGS_CHARS:
        raise argparse.ArgumentTypeError(f"--model-kwargs is longer than {MAX_KWARGS_CHARS} characters; "
                                         "give a few keyword arguments")
    try:
        value = json.loads(text)
    except (RecursionError, ValueError) as exc:
        if not isinstance(exc, json.JSONDecodeError):
            raise argparse.ArgumentTypeError(f"--model-kwargs is nested deeper than {MAX_KWARGS_DEPTH} levels or holds "
                                             "an unreadable number; give plain keyword arguments") from None
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object such as '{{\"num_classes\": 10}}' ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object such as '{\"num_classes\": 10}'")
    if not _depth(value, MAX_KWARGS_DEPTH):
        raise argparse.ArgumentTypeError(f"--model-kwargs is nested deeper than {MAX_KWARGS_DEPTH} levels; "
                                         "give plain keyword arguments")
    return value


def bounded_int(low: int, high: int, what: str):
    """An argparse type: an integer in ``low..high`` (a one-line error naming the range otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer in {low}..{high}, got {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be an integer in {low}..{high}, got {text[:40]}")
        return value

    parse.__name__ = what.lstrip("-")
    return parse


seed_arg = bounded_int(-MAX_SEED - 1, MAX_SEED, "--seed")
threads_arg = bounded_int(1, MAX_THREADS, "--threads")


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
    if checkpoint_ok:
        p.add_argument("--model", dest="dense_model", default=None, metavar="PKG.MOD:FACTORY",
                       help="for a checkpoint of your own model: the factory that builds it dense "
                            "(with --model-kwargs); the checkpoint's surgery and weights are applied to it")
        add_trust_args(p)


def _input_arg(text: str):
    from ..models import parse_input_spec

    try:
        return parse_input_spec(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def example_arg(args: argparse.Namespace):
    """The ``--input`` specs, or None (then ``--input-size`` or the model's default)."""
    return getattr(args, "input", None) or None


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """--trust-source and --allow-nonfinite, for commands that read checkpoints."""
    p.add_argument("--trust-source", action="store_true",
                   help="let a checkpoint whose model source is an import path pkg.mod:factory run it")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/inf weights")


def load_options(args: argparse.Namespace) -> dict[str, bool]:
    """The checkpoint-loading options of a parsed command line."""
    return {"trust_source": bool(getattr(args, "trust_source", False)),
            "allow_nonfinite": bool(getattr(args, "allow_nonfinite", False))}


def add_surgery_args(p: argparse.ArgumentParser, *, budget: bool = False) -> None:
    """The surgery's flags; ``budget``: also --target-macs/--target-params/--match-macs (convert)."""
    g = p.add_argument_group("surgery")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--compress", type=_positive_float, default=None, metavar="C",
                     help="compression C: degree D = C_in // C (default 2)")
    how.add_argument("--degree", type=int, default=None, metavar="D", help="explicit degree D per output")
    if budget:
        how.add_argument("--target-macs", default=None, metavar="N",
                         help="choose the compression whose converted model runs N MACs (within 2%%) on the "
                              "example: 1.2G, 300M, 4.5k or an integer")
        how.add_argument("--target-params", default=None, metavar="N",
                         help="choose the compression whose converted model has N parameters (within 2%%)")
        how.add_argument("--match-macs", default=None, metavar="MODEL",
                         help="choose the compression whose converted model runs the MACs of MODEL (a model "
                              "name or import path, on the same --input / --input-size)")
    g.add_argument("--mixing", type=int, default=1, metavar="K",
                   help="blocks reading each input: 1 (default) = shuffle + grouped conv, mixing across layers "
                        "(alternate mix points); 2 = every layer an expander")
    g.add_argument("--graph", default="auto",
                   help="auto (default: paired where a layer mixes 2, else random), "
                        + ", ".join(n for n in list_graphs() if n != "auto"))
    g.add_argument("--mix-points", default="auto", choices=list(MIX_POINTS),
                   help="chain: the widest layer of each chain of converted layers (and a layer parallel "
                        "to a chain, e.g. a downsample) is grouped, the others mix; alternate: every other "
                        "layer of a chain mixes, the widest grouped; every: the graph at every layer; "
                        "auto (default): alternate at mixing 1, else every")
    g.add_argument("--seed", type=seed_arg, default=0)
    g.add_argument("--init", default="kaiming",
                   help="kaiming (default), keep (copy kept dense weights) or project (refit them to the dense "
                        "layer's outputs on calibration data; convert --calibration)")
    g.add_argument("--layers", nargs="+", default=["pointwise", "conv", "linear"],
                   help="kinds to convert: pointwise conv linear (default: all)")
    g.add_argument("--include", nargs="+", default=[], metavar="GLOB", help="convert these despite the defaults")
    g.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="never convert these")
    g.add_argument("--include-stem", action="store_true", help="convert the stem conv too")
    g.add_argument("--include-classifier", action="store_true", help="convert the classifier too")
    g.add_argument("--min-channels", type=int, default=0, metavar="N", help="skip layers with fewer input channels")
    g.add_argument("--plan", default=None, metavar="FILE", help="YAML/JSON per-pattern rules")
    g.add_argument("--execution", default="auto", help="auto (default), gather or masked")


def sparsity_config(args: argparse.Namespace) -> SparsityConfig:
    """The command line's sparsity settings as one config."""
    return SparsityConfig(compress=args.compress, degree=args.degree, mixing=args.mixing, graph=args.graph,
                          seed=args.seed, execution=args.execution, mix_points=args.mix_points)


def surgery_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``convert`` keyword arguments: the sparsity config and the layer selection."""
    return {
        "config": sparsity_config(args), "init": args.init, "layers": args.layers, "include": args.include,
        "exclude": args.exclude, "include_stem": args.include_stem,
        "include_classifier": args.include_classifier, "min_channels": args.min_channels, "plan": args.plan,
    }


def budget_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``convert``'s budget keywords (None where not given)."""
    return {k: getattr(args, k, None) for k in ("target_macs", "target_params", "match_macs")}


def add_output_args(p: argparse.ArgumentParser, *, table: bool = True, force: bool = True,
                    save_formats: bool = False) -> None:
    """The output convention of every command: ``--json [FILE]`` (stdout without FILE), ``--force``,
    and for commands that print a table ``--format``, ``--max-rows``, ``--all``, ``--width``
    (``save_formats``: ``--format hf`` also names how ``-o`` is written, the table printed as a table)."""
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write JSON to FILE (atomic; --force to overwrite), or to stdout without FILE")
    if force:
        p.add_argument("--force", action="store_true", help="overwrite existing output files")
    if table:
        extra = ("hf",) if save_formats else ()
        p.add_argument("--format", dest="fmt", choices=("table", "markdown", "csv", "json", *extra), default="table",
                       help="how to print the table on stdout (default table)"
                       + ("; hf: write -o as a Hugging Face folder (config.json + model.safetensors), the table "
                          "printed as a table" if save_formats else ""))
        p.add_argument("--max-rows", type=int, default=None, metavar="N",
                       help="collapse repeated identical layers past N rows (default 40) and cut the rest")
        p.add_argument("--all", dest="show_all", action="store_true", help="every layer on its own row")
        p.add_argument("--width", type=int, default=None, metavar="N",
                       help="fit the table to N columns (default: the terminal's, 80 in a pipe; 0: every column)")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars or status lines (results and errors still print)."""
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars or status lines")


def table_options(args: argparse.Namespace) -> dict[str, Any]:
    """``render``/``emit_grid`` keyword arguments of a parsed command line."""
    return {"fmt": getattr(args, "fmt", "table"), "width": getattr(args, "width", None)}
