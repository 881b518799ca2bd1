"""``xsurgery sweep``: train variants of a recipe, measure them, rank them on the frontier."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import UserError
from ._args import add_output_args
from ._train import intermixed

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _split_overrides(args: argparse.Namespace) -> None:
    """``--variants``/``--seeds``/``--batch`` take several values, so argparse hands them the
    ``key=value`` overrides that follow; move those back (a variant's options come after an ``@``)."""
    for name in ("variants", "seeds", "batch"):
        values = getattr(args, name)
        keep = [v for v in values if not _OVERRIDE.match(v)]
        args.overrides = [*args.overrides, *(v for v in values if _OVERRIDE.match(v))]
        setattr(args, name, keep)
    for name in ("seeds", "batch"):
        try:
            setattr(args, name, [int(s) for s in getattr(args, name)])
        except ValueError:
            raise UserError(f"--{name} takes integers, got {' '.join(getattr(args, name))}") from None
    if not args.batch:
        raise UserError("give --batch N... (e.g. --batch 1 8)")
    if not args.variants or not args.seeds:
        raise UserError("give --variants V... and --seeds S... (e.g. --variants dense x@2 --seeds 0)")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .._util.io import check_output
    from ..bench.sweep import json_ready, sweep

    args.overrides = list(args.overrides or [])
    _split_overrides(args)
    flags = [o for o in args.overrides if o.startswith("-")]
    if flags:
        raise UserError(f"put options such as {flags[0]} before the key=value overrides")
    if args.jobs < 1 or args.threads < 1 or min(args.batch) < 1:
        raise UserError("--jobs, --threads and --batch must be >= 1")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"-o {args.output} is a file; give a folder (finished runs in it are skipped)")
    if args.json and args.json != "-":
        check_output(args.json)  # before hours of training, not after
    quiet = getattr(args, "quiet", False)
    result = sweep(args.recipe, args.variants, seeds=args.seeds, overrides=args.overrides, out=args.output,
                   jobs=args.jobs, threads=args.threads, device=args.device,
                   runtime=None if args.runtime == "none" else args.runtime, batch=args.batch,
                   log=(lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr)))
    if args.json:
        from ..analysis import emit_json

        emit_json(json_ready({"variants": result["variants"], "meta": result["meta"]}), args.json, False)
        if args.json == "-":
            return 0
    for row in result["variants"]:
        lat = row["latency"]
        lat_text = "n/a" if lat != lat else f"{lat:.2f}x"
        front = "front" if row["front_latency"] else ""
        print(f"{row['variant']:<22} top-1 {row['top1']:6.2f} ± {row['top1_std']:4.2f}  "
              f"latency {lat_text:>6}  {front}")
    print(f"wrote {os.path.join(args.output, 'README.md')} (table and plots), summary.json, results/")
    return 0


def add_cli(subparsers) -> None:
    """Register ``xsurgery sweep``."""
    from ..export import RUNTIMES

    p = subparsers.add_parser("sweep", help="train variants of a recipe and rank them: top-1 against latency, "
                                            "MACs and parameters")
    p.add_argument("recipe", help="recipe YAML file (recipes/<name>.yaml, or just <name>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for every run, e.g. epochs=1")
    p.add_argument("--variants", nargs="+", required=True, metavar="V",
                   help="recipe variants or dense@W, x@C, grouped@C, wide-x@W, tp@C, "
                        "unstructured@C (x@4:mixing=1,mix_points=chain; tp@4:epochs=2,lr=0.01)")
    p.add_argument("--seeds", nargs="+", default=["0"], metavar="S", help="seeds (default 0)")
    p.add_argument("-o", "--output", default="sweep", metavar="FOLDER",
                   help="results folder (default sweep/); finished runs are skipped, started ones resumed")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="trainings at a time (default 1)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="threads per training (default 1)")
    p.add_argument("--device", default="cpu", help="training device: cpu (default), cuda, cuda:N")
    p.add_argument("--runtime", default="onnxruntime", choices=[*RUNTIMES, "none"],
                   help="where latency is measured (default onnxruntime; none: not measured)")
    p.add_argument("--batch", nargs="+", default=["1"], metavar="N",
                   help="batch(es) of the latency measurement (default 1; --batch 1 8: both, the front at the first)")
    add_output_args(p, table=False, force=False)
    p.set_defaults(func=_cmd_sweep)
    p.__class__ = intermixed(type(p))
