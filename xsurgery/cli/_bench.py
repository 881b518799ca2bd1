"""Latency benchmarks: X-models against dense and grouped, as ratios, all in one process."""

from __future__ import annotations

import argparse
import json

from ..bench import (
    ALL_BACKENDS,
    ALL_VARIANTS,
    BACKENDS,
    INT8_VARIANTS,
    ORT_LAYOUTS,
    VARIANTS,
    bench,
    csv_table,
    markdown_table,
    plot,
    print_table,
    write_json,
)
from ..errors import UserError


def add_cli(subparsers) -> None:
    """Register ``xsurgery bench``."""
    from ._args import add_trust_args, threads_arg

    p = subparsers.add_parser("bench", help="time a model's X variants against dense and grouped (ratios)",
                              description=__doc__)
    p.add_argument("model", help="torchvision/timm name, import path or checkpoint (the dense architecture it was "
                                          "converted from is the baseline)")
    p.add_argument("--compress", type=float, nargs="+", required=True, help="one or more compressions C")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=threads_arg, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--backends", nargs="+", default=None, choices=ALL_BACKENDS,
                   help=f"default {', '.join(BACKENDS)}; add openvino (optional dependency); with --quantize: "
                        f"ort and openvino (when installed)")
    p.add_argument("--variants", nargs="+", default=None, choices=ALL_VARIANTS,
                   help=f"default: the X variants ({', '.join(VARIANTS)}); add thin / tp / tp8 for dense models at "
                        f"the same MACs (uniformly thinned; Torch-Pruning, tp8 with round_to=8); with --quantize: "
                        f"{', '.join(INT8_VARIANTS)} (x-k2: mixing 2)")
    p.add_argument("--quantize", default=None, metavar="int8",
                   help="time int8 files (each variant exported with --quantize int8, random calibration) in the "
                        "runtimes; ratios to int8 dense")
    p.add_argument("--repeat", type=int, default=15, help="timed rounds (median and IQR over these)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ort-layout", choices=ORT_LAYOUTS, default="auto",
                   help="auto: export every variant as `xsurgery export` does; fixed: gather/dense, faster")
    p.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N", help="e.g. 3 224 224")
    from ._args import _input_arg

    p.add_argument("--input", action="append", default=None, metavar="[NAME=]SHAPE[:DTYPE]", type=_input_arg,
                   help="an example input, repeatable (e.g. 1x128:int64); replaces --batch/--input-size")
    p.add_argument("--json", dest="json_out", nargs="?", const="-", default=None, metavar="FILE",
                   help="the result as JSON: on stdout (and nothing else) without FILE, else to FILE")
    p.add_argument("--format", dest="fmt", choices=("table", "markdown", "csv", "json"), default="table",
                   help="how to print the table on stdout (default table)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="latency ratio vs compression (matplotlib)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (as --format markdown)")
    p.add_argument("--force", action="store_true", help="overwrite --json/--plot files")
    add_trust_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .._util.io import check_output
    from .._util.progress import enabled
    from ._args import load_options

    for out in (args.json_out, args.plot):
        if out and out != "-":
            check_output(out, force=args.force)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UserError("--plot needs matplotlib: pip install 'xsurgery[plot]'") from exc
    compress = args.compress[0] if len(args.compress) == 1 else args.compress
    result = bench(args.model, compress, batch=args.batch, threads=args.threads, backends=args.backends,
                   variants=args.variants, repeat=args.repeat, input_size=args.input_size, warmup=args.warmup,
                   ort_layout=args.ort_layout, example_inputs=args.input or None,
                   show_progress=enabled(), load_options=load_options(args), quantize=args.quantize)
    if args.json_out == "-" or args.fmt == "json":
        print(json.dumps(result, indent=1))
    elif args.fmt == "csv":
        print(csv_table(result), end="")
    elif args.fmt == "markdown":
        print(markdown_table(result))
    else:
        print_table(result)
        if args.markdown:
            print(markdown_table(result))
    if args.json_out and args.json_out != "-":
        write_json(result, args.json_out, force=args.force)
    if args.plot:
        plot(result, args.plot)
    return 0
