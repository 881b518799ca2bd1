"""``xsurgery export MODEL -o OUT.onnx``."""

from __future__ import annotations

from dataclasses import asdict

from ..errors import UserError
from ..export import DEFAULT_OPSET, LAYOUTS, RUNTIMES, export_onnx


def _cmd_export(args) -> int:
    from .._util.io import check_output
    from ..checkpoint import resolve_model
    from ._args import example_arg, load_options

    if args.json not in (None, "-"):
        check_output(args.json, force=args.force)
        if args.json == args.output:
            raise UserError("-o and --json name the same file; give them different names")
    model = resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model, **load_options(args))
    res = export_onnx(
        model, args.output, input_size=args.input_size, example_inputs=example_arg(args), layout=args.layout,
        opset=args.opset,
        static_batch=args.static_batch, verify=not args.no_verify, rtol=args.rtol, atol=args.atol,
        benchmark=args.benchmark, force=args.force, threads=args.threads,
        verbose=args.json != "-" and not getattr(args, "quiet", False),
        allow_nonfinite=args.allow_nonfinite, runtime=args.runtime,
    )
    from ..analysis import emit_json

    emit_json({**asdict(res), "latency_ratio": res.latency_ratio}, args.json, args.force)
    return 0


def add_cli(subparsers) -> None:
    """Register ``xsurgery export MODEL -o OUT.onnx``."""
    from ._args import add_model_args, threads_arg

    p = subparsers.add_parser("export", help="export to ONNX (Gather + grouped Conv), verified in ONNX Runtime")
    add_model_args(p, checkpoint_ok=True)
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="gather, matmul (linear layers as a batched MatMul), dense, or auto (default: time every "
                        "form per layer and the whole model in the runtime, keep the fastest)")
    p.add_argument("--opset", type=int, default=None, metavar="N", help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--static-batch", type=int, default=None, metavar="N", help="fix the batch size (default dynamic)")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification tolerance relative to max|output| (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute floor of the tolerance (default 1e-6)")
    p.add_argument("--no-verify", action="store_true", help="skip the ORT-vs-torch comparison")
    p.add_argument("--benchmark", action="store_true", help="time ORT latency against the dense original")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="the runtime auto tunes the layout in, and verifies/benchmarks with (openvino: optional)")
    p.add_argument("--threads", type=threads_arg, default=None, metavar="N", help="ORT intra-op threads (default ORT's)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="the result as JSON: on stdout (and nothing else) without FILE, else to FILE")
    p.set_defaults(func=_cmd_export)
