"""``xsurgery export MODEL -o OUT.onnx``."""

from __future__ import annotations

from dataclasses import asdict

from ..errors import UserError
from ..export import DEFAULT_OPSET, GATHER_CHOICES, INT8_RTOL, LAYOUTS, MAX_TOP1_DROP, QUANTIZE, RUNTIMES, export_onnx

CALIBRATION_BATCH = 32  # images per calibration / test batch read from a recipe


def _cmd_export(args) -> int:
    from .._util.io import check_output
    from ..checkpoint import resolve_model
    from ._args import example_arg, load_options

    if args.json not in (None, "-"):
        check_output(args.json, force=args.force)
        if args.json == args.output:
            raise UserError("-o and --json name the same file; give them different names")
    if args.quantize is not None and args.quantize not in QUANTIZE:
        raise UserError(f"unknown --quantize {args.quantize!r}; use --quantize {' or '.join(QUANTIZE)} (or leave it "
                        f"out for float32)")
    if args.quantize is None and (args.calibration or args.test_images is not None):
        raise UserError("--calibration/--test-images calibrate an int8 export: add --quantize int8")
    if args.calibration_batches < 1 or (args.test_images is not None and args.test_images < 0):
        raise UserError("--calibration-batches must be >= 1 and --test-images >= 0")
    calibration, test_data = (recipe_batches(args.calibration, args.calibration_batches, args.test_images)
                              if args.calibration else (None, None))
    model = resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model, **load_options(args))
    res = export_onnx(
        model, args.output, input_size=args.input_size, example_inputs=example_arg(args), layout=args.layout,
        opset=args.opset,
        static_batch=args.static_batch, verify=not args.no_verify, rtol=args.rtol, atol=args.atol,
        benchmark=args.benchmark, force=args.force, threads=args.threads,
        verbose=args.json != "-" and not getattr(args, "quiet", False),
        allow_nonfinite=args.allow_nonfinite, runtime=args.runtime,
        quantize=args.quantize, calibration=calibration, test_data=test_data, int8_gather=args.int8_gather,
        int8_rtol=args.int8_rtol, max_top1_drop=args.max_top1_drop,
    )
    from ..analysis import emit_json

    emit_json({**asdict(res), "latency_ratio": res.latency_ratio}, args.json, args.force)
    return 0


def recipe_batches(path: str, batches: int, test_images: int | None = None) -> tuple[list, list | None]:
    """A recipe's calibration batches (``batches`` x :data:`CALIBRATION_BATCH` training images, a
    seeded shuffle) and its labelled test batches (the first ``test_images``; None: all, 0: none)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from .._util.text import safe_text
    from ..train import build_splits, load_recipe

    if path.endswith((".xs", ".onnx", ".safetensors", ".pt", ".pth")):
        raise UserError(f"--calibration takes a training recipe (recipes/<name>.yaml), not the model file "
                        f"{safe_text(path)}")
    try:
        recipe = load_recipe(path)
    except UserError as exc:
        raise UserError(f"--calibration {safe_text(path)} is not a usable training recipe: {exc}") from None
    splits = build_splits(recipe.data, recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(splits.train, batch_size=CALIBRATION_BATCH, shuffle=True, generator=gen)
    calibration = [x for (x, _), _ in zip(loader, range(batches))]
    test = None
    if test_images != 0:
        data = splits.test if test_images is None else Subset(splits.test, range(min(test_images, len(splits.test))))
        test = DataLoader(data, batch_size=CALIBRATION_BATCH)
    return calibration, test


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
    q = p.add_argument_group("int8 (static QDQ quantization through ONNX Runtime)")
    q.add_argument("--quantize", default=None, metavar="int8",
                   help="write an int8 file: the float export, verified, then quantized and compared with it")
    q.add_argument("--calibration", default=None, metavar="RECIPE",
                   help="calibrate on this training recipe's training images (and measure top-1 on its test "
                        "split); default random inputs, with a warning")
    q.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                   help=f"calibration batches of {CALIBRATION_BATCH} images (default 8)")
    q.add_argument("--test-images", type=int, default=None, metavar="N",
                   help="top-1 on the first N test images (default all; 0: none)")
    q.add_argument("--int8-gather", choices=GATHER_CHOICES, default="auto",
                   help="X-layers' Gather in int8 or float; auto (default): whichever verifies and runs faster")
    q.add_argument("--int8-rtol", type=float, default=INT8_RTOL,
                   help=f"fail when max|int8 - float| > this x max|float output| (default {INT8_RTOL:g})")
    q.add_argument("--max-top1-drop", type=float, default=MAX_TOP1_DROP, metavar="POINTS",
                   help=f"fail when int8 top-1 is more than this below float (default {MAX_TOP1_DROP:g})")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="the result as JSON: on stdout (and nothing else) without FILE, else to FILE")
    p.set_defaults(func=_cmd_export)
