"""Latency benchmarks: X-models against dense and grouped, as ratios, all in one process.

``bench(model, compress)`` builds every requested variant of one model (dense, grouped,
X with mixing 1/2/4, X exact, masked-dense, and the library default), times each with torch
eager inference, a torch training step (forward + backward) and ONNX Runtime, and reports
median and spread per (variant, backend) with the ratio to dense and the MACs ratio, which
is the limit a sparse layer could reach.

Timings are interleaved: each repetition runs every (variant, backend) once, so a load
change on a shared machine moves all of them alike and the ratios stay comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import UserError

__all__ = [
    "BACKENDS",
    "VARIANTS",
    "VARIANT_OPTIONS",
    "Timing",
    "add_cli",
    "bench",
    "count_macs",
    "markdown_table",
    "machine_info",
    "measure",
    "ort_runner",
    "versions",
]

VARIANTS = ("dense", "grouped", "x-k1", "x-k2", "x-k4", "x-exact", "masked", "default")
BACKENDS = ("torch", "torch-train", "ort")

# convert() options per variant; "default" is convert() with no options (and export with none).
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "grouped": {"graph": "grouped"},
    "x-k1": {"mixing": 1},
    "x-k2": {"mixing": 2},
    "x-k4": {"mixing": 4},
    "x-exact": {"graph": "exact"},
    "masked": {"mixing": 2, "execution": "masked"},
    "default": {},
}


# ----------------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    """CPU model, logical core count, OS and the load average at the time of the call."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str | None]:
    """Versions of python and of the libraries that set the timings (None if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "xsurgery": __version__}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Per-call latency statistics of one runner, in milliseconds."""

    median_ms: float
    spread_ms: float  # inter-quartile range of the samples
    min_ms: float
    max_ms: float
    samples: int
    calls_per_sample: int


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _calls_per_sample(fn: Callable[[], Any], min_sample_ms: float) -> int:
    t0 = time.perf_counter()
    fn()
    once = (time.perf_counter() - t0) * 1e3
    return max(1, min(10_000, int(min_sample_ms / max(once, 1e-4)) + 1)) if once < min_sample_ms else 1


def measure(
    runners: dict[Hashable, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeat: int = 15,
    min_sample_ms: float = 5.0,
    progress: Callable[[], None] | None = None,
) -> dict[Hashable, Timing]:
    """Time several callables interleaved: each repetition runs every one of them once.

    Fast callables are looped ``calls_per_sample`` times per sample (so one sample lasts at
    least ``min_sample_ms``); the reported times are per call.

    Args:
        runners: key -> zero-argument callable.
        warmup: untimed rounds before the timed ones (after calibration).
        repeat: timed rounds; the median and the inter-quartile range are over these.
        min_sample_ms: shortest sample, to keep timer resolution and call overhead small.
        progress: called once per timed sample.
    """
    if repeat < 1:
        raise UserError(f"repeat must be >= 1, got {repeat}")
    inner = {k: _calls_per_sample(fn, min_sample_ms) for k, fn in runners.items()}
    for _ in range(warmup):
        for k, fn in runners.items():
            for _ in range(inner[k]):
                fn()
    samples: dict[Hashable, list[float]] = {k: [] for k in runners}
    for _ in range(repeat):
        for k, fn in runners.items():
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[k].append((time.perf_counter() - t0) * 1e3 / n)
            if progress is not None:
                progress()
    out = {}
    for k, vals in samples.items():
        s = sorted(vals)
        out[k] = Timing(
            median_ms=statistics.median(s), spread_ms=_quantile(s, 0.75) - _quantile(s, 0.25),
            min_ms=s[0], max_ms=s[-1], samples=len(s), calls_per_sample=inner[k],
        )
    return out


def _call(model: nn.Module, x: Any) -> Any:
    """``x``: a tensor or an ``(args, kwargs)`` example."""
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], dict):
        return model(*x[0], **x[1])
    return model(x)


def torch_runner(model: nn.Module, x: Any) -> Callable[[], Any]:
    """Eager inference: ``model.eval()`` and ``torch.no_grad()``."""
    model.eval()

    def run():
        with torch.no_grad():
            return _call(model, x)

    return run


def train_runner(model: nn.Module, x: Any) -> Callable[[], Any]:
    """A training step without the optimizer: forward in train mode, mean of the output, backward."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        out = _call(model, x)
        out = next(iter(out.values())) if isinstance(out, dict) else out
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().mean().backward()

    return run


def _ort_session(path: str | os.PathLike, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # idle pool threads must not spin: they would steal the cores from the next runner timed
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(path: str | os.PathLike, x: Any, threads: int | None = None) -> Callable[[], Any]:
    """ONNX Runtime CPU inference of an exported file on the fixed input ``x`` (a tensor or an example)."""
    from ._inputs import flat_tensors

    sess = _ort_session(path, threads)
    tensors = flat_tensors(x) if isinstance(x, tuple) else [x]
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), tensors)}

    def run():
        return sess.run(None, feed)

    return run


ORT_LAYOUTS = ("auto", "fixed")


def _ort_layout(variant: str, ort_layout: str) -> str | None:
    """The export layout of a variant: ``auto`` = export's own default for every variant
    (masked as ``dense``); ``fixed`` = ``gather`` for X variants and ``dense`` for masked and
    exact (no per-layer timing, much faster to export); ``default`` always gets no option."""
    if variant in ("default", "dense"):
        return None
    if variant == "masked":
        return "dense"
    if ort_layout == "fixed":
        return "dense" if variant == "x-exact" else "gather"
    return None


def _export_model(model: nn.Module, x: Any, path: Path, layout: str | None, threads: int | None) -> str:
    """Export with ``export_onnx``'s defaults (``layout="auto"``, dynamic batch) unless a layout is given."""
    from .export import export_onnx

    kwargs: dict[str, Any] = {"example_inputs": x, "verify": False, "verbose": False}
    if layout is not None:
        kwargs["layout"] = layout
    kwargs["threads"] = threads  # the machine's setting, not an option: auto times its layouts with it
    result = export_onnx(model, str(path), **kwargs)
    chosen = list((getattr(result, "layers", None) or {}).values())
    if layout is None and chosen:  # what auto picked, e.g. "auto: 37/52 gather"
        return f"auto: {chosen.count('gather')}/{len(chosen)} gather"
    return layout or "auto"


# ----------------------------------------------------------------------------- MACs


def count_macs(model: nn.Module, x: Any) -> int:
    """Multiply-accumulates of one inference at ``x``'s shape, X-layers at their compact size.

    The report's counter (:func:`xsurgery.analysis.report`): conv/linear/X-layers by shape,
    and every matmul or attention kernel elsewhere, whatever the execution.
    """
    from .analysis import report

    return int(report(model, example_inputs=x).totals["macs_after"])


# ----------------------------------------------------------------------------- models


def _create(model: str | nn.Module, **load_options: bool) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from .checkpoint import resolve_model

    return resolve_model(model, **load_options)


def _convert(model: nn.Module, compress: float, options: dict[str, Any], example) -> nn.Module:
    from .surgery import convert

    converted, _report = convert(model, compress=compress, example_inputs=example, **options)
    return converted


# ----------------------------------------------------------------------------- bench


def _check_choices(values: Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UserError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not values:
        raise UserError(f"give at least one {what}")
    return values


def bench(
    model: str | nn.Module,
    compress: float | Sequence[float],
    batch: int = 1,
    threads: int | None = None,
    backends: Sequence[str] = BACKENDS,
    variants: Sequence[str] = VARIANTS,
    repeat: int = 15,
    input_size: Sequence[int] | None = None,
    *,
    warmup: int = 3,
    min_sample_ms: float = 5.0,
    ort_layout: str = "auto",
    show_progress: bool = False,
    load_options: dict[str, bool] | None = None,
    example_inputs: Any = None,
) -> dict[str, Any]:
    """Time the variants of one model as ratios to the dense model.

    Args:
        model: a name for :func:`xsurgery._sources.create_model` or a module (the dense model).
        compress: one compression C or several (one dense reference serves all of them).
        batch: batch size N of the timed input ``[N, *input_size]``.
        threads: intra-op threads for torch and ONNX Runtime (default: torch's current count).
        backends: subset of :data:`BACKENDS`.
        variants: subset of :data:`VARIANTS`; ``dense`` is always measured (the reference).
        repeat: timed rounds; every (variant, backend) runs once per round.
        input_size: ``(C, H, W)`` (or the feature shape); default from the model.
        warmup: untimed rounds.
        min_sample_ms: fast calls are looped to at least this long per sample.
        ort_layout: ``auto`` (every variant exported as ``export_onnx`` does by default) or
            ``fixed`` (gather / dense per variant, no per-layer timing at export); see
            :func:`_ort_layout`. The ``default`` variant always uses export's defaults.
        show_progress: a progress bar on stderr.
        load_options: ``trust_source`` / ``allow_nonfinite`` when ``model`` is a checkpoint.
        example_inputs: a tensor, tuple or dict of inputs (or ``--input`` specs) instead of
            ``[batch, *input_size]``; its own batch is timed.

    Returns:
        ``{"model", "compress", "batch", "threads", "input_size", "versions", "machine",
        "macs", "results": [{"variant", "compress", "backend", "median_ms", "spread_ms",
        "min_ms", "max_ms", "ratio_to_dense", "macs_ratio", ...}]}``; ``compress`` is the
        number given, or the list when several were.
    """
    backends = _check_choices(backends, BACKENDS, "backend")
    variants = _check_choices(variants, VARIANTS, "variant")
    many = not isinstance(compress, (int, float))
    compresses = [float(c) for c in (compress if many else [compress])]
    if not compresses or any(c < 1 for c in compresses):
        raise UserError(f"compression must be >= 1, got {', '.join(f'{c:g}' for c in compresses) or 'none'}")
    if ort_layout not in ORT_LAYOUTS:
        raise UserError(f"unknown ort_layout {ort_layout!r}; use one of {', '.join(ORT_LAYOUTS)}")
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    if "ort" in backends:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise UserError("the ort backend needs onnxruntime: pip install 'xsurgery[onnx]'") from exc

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    try:
        dense = _create(model, **(load_options or {})).eval()
        from ._inputs import describe, per_sample_size, resolve

        x = resolve(dense, example_inputs, input_size, batch=batch)
        if x is None:
            raise UserError("bench needs an example input for this model: pass --input SHAPE[:DTYPE] or --input-size")
        size = per_sample_size(x)
        models: dict[tuple[str, float], nn.Module] = {("dense", 1.0): dense}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # block counts rounded to divisors: expected here
            for c in compresses:
                for v in variants:
                    if v != "dense":
                        models[(v, c)] = _convert(dense, c, VARIANT_OPTIONS[v], x).eval()
        macs = {key: count_macs(m, x) for key, m in models.items()}
        with tempfile.TemporaryDirectory(prefix="xsurgery-bench-") as tmp:
            runners: dict[Hashable, Callable[[], Any]] = {}
            layouts: dict[tuple[str, float], str] = {}
            for (v, c), m in models.items():
                if "torch" in backends:
                    runners[(v, c, "torch")] = torch_runner(m, x)
                if "torch-train" in backends:
                    runners[(v, c, "torch-train")] = _train_runner_copy(m, x)
                if "ort" in backends:
                    path = Path(tmp) / f"{v}-{c:g}.onnx"
                    layouts[(v, c)] = _export_model(m, x, path, _ort_layout(v, ort_layout), threads)
                    runners[(v, c, "ort")] = ort_runner(path, x, threads)
            timings = _measure_with_progress(runners, warmup, repeat, min_sample_ms, show_progress)
            del runners
    finally:
        torch.set_num_threads(old_threads)

    results = []
    for (v, c, b), t in timings.items():
        ref = timings[("dense", 1.0, b)]
        results.append({
            "variant": v, "compress": 1.0 if v == "dense" else c, "backend": b,
            "median_ms": round(t.median_ms, 4), "spread_ms": round(t.spread_ms, 4),
            "min_ms": round(t.min_ms, 4), "max_ms": round(t.max_ms, 4),
            "ratio_to_dense": round(t.median_ms / ref.median_ms, 4),
            "macs_ratio": round(macs[(v, c)] / macs[("dense", 1.0)], 4),
            "samples": t.samples, "calls_per_sample": t.calls_per_sample,
            **({"layout": "none" if v == "dense" else layouts[(v, c)]} if b == "ort" else {}),
        })
    return {
        "model": model if isinstance(model, str) else type(model).__name__,
        "compress": compresses if many else compresses[0],
        "batch": batch,
        "threads": threads,
        "input_size": list(size),
        "inputs": describe(dense, x),
        "repeat": repeat,
        "ort_layout": ort_layout,
        "warmup": warmup,
        "versions": versions(),
        "machine": machine_info(),
        "macs": {"dense": macs[("dense", 1.0)]},
        "results": results,
    }


def _train_runner_copy(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    # a copy, so that train mode (BatchNorm statistics) does not touch the inference model
    import copy

    return train_runner(copy.deepcopy(model), x)


def _measure_with_progress(runners, warmup, repeat, min_sample_ms, show_progress):
    """Backend by backend (two runtimes' thread pools never alternate), variants interleaved."""
    groups: dict[str, dict] = {}
    for key, fn in runners.items():
        groups.setdefault(key[-1], {})[key] = fn
    out: dict = {}
    if not show_progress:
        for group in groups.values():
            out.update(measure(group, warmup=warmup, repeat=repeat, min_sample_ms=min_sample_ms))
        return out
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("timing", total=repeat * len(runners))
        for group in groups.values():
            out.update(measure(group, warmup=warmup, repeat=repeat, min_sample_ms=min_sample_ms,
                               progress=lambda: bar.advance(task)))
    return out


# ----------------------------------------------------------------------------- output


def print_table(result: dict[str, Any], console=None) -> None:
    """A rich table of one :func:`bench` result."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result["machine"]
    table = Table(title=(f"{result['model']}  batch {result['batch']}  input {result['input_size']}  "
                         f"{result['threads']} threads  {m['cpu']}"))
    for col in ("variant", "C", "backend", "median ms", "IQR ms", "x dense", "MACs x", "x limit"):
        table.add_column(col, justify="left" if col in ("variant", "backend") else "right")
    order = {b: i for i, b in enumerate(BACKENDS)}
    vorder = {v: i for i, v in enumerate(VARIANTS)}
    rows = sorted(result["results"], key=lambda r: (order[r["backend"]], r["compress"] if r["variant"] != "dense"
                                                    else 0, vorder[r["variant"]]))
    last = None
    for r in rows:
        if last is not None and r["backend"] != last:
            table.add_section()
        last = r["backend"]
        table.add_row(
            r["variant"], f"{r['compress']:g}", r["backend"], f"{r['median_ms']:.3f}", f"{r['spread_ms']:.3f}",
            f"{r['ratio_to_dense']:.2f}", f"{r['macs_ratio']:.2f}", f"{r['ratio_to_dense'] / r['macs_ratio']:.2f}",
        )
    console.print(table)
    v = result["versions"]
    console.print(f"torch {v['torch']}, onnxruntime {v['onnxruntime']}; x dense = median / dense median; "
                  "x limit = (x dense) / (MACs x), 1.0 = as fast as the MACs allow")


def markdown_table(result: dict[str, Any], backends: Sequence[str] = BACKENDS) -> str:
    """A Markdown table: one row per variant and compression, per backend the ratio to dense
    (with the dense median in ms in the dense row), and the MACs ratio."""
    rows = result["results"]
    present = [b for b in backends if any(r["backend"] == b for r in rows)]
    by = {(r["variant"], r["compress"], r["backend"]): r for r in rows}
    keys = sorted({(r["variant"], r["compress"]) for r in rows},
                  key=lambda k: (k[1] if k[0] != "dense" else 0, VARIANTS.index(k[0])))
    lines = ["| variant | C | " + " | ".join(present) + " | MACs |", "|---|---|" + "---|" * (len(present) + 1)]
    for v, c in keys:
        cells = []
        for b in present:
            r = by.get((v, c, b))
            if r is None:
                cells.append("-")
            elif v == "dense":
                cells.append(f"{r['median_ms']:.1f} ms (IQR {r['spread_ms']:.1f})")
            else:
                cells.append(f"{r['ratio_to_dense']:.2f}")
        macs = next(r["macs_ratio"] for (vv, cc, _), r in by.items() if (vv, cc) == (v, c))
        lines.append(f"| {v} | {c:g} | " + " | ".join(cells) + f" | {macs:.2f} |")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]] | dict[str, Any], path: str | os.PathLike) -> None:
    """Latency ratio to dense against compression, one panel per backend, MACs ratio as the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = results if isinstance(results, dict) else results[0]
    rows = result["results"]
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, b in zip(axes[0], backends):
        mine = [r for r in rows if r["backend"] == b and r["variant"] != "dense"]
        for v in VARIANTS[1:]:
            pts = sorted((r["compress"], r["ratio_to_dense"]) for r in mine if r["variant"] == v)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        limit = sorted({(r["compress"], r["macs_ratio"]) for r in mine})
        if limit:
            ax.plot(*zip(*limit), "k--", marker="x", label="MACs ratio (limit)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{result['model']} - {b}")
        ax.set_xlabel("compression C")
        ax.set_ylabel("latency / dense")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["compress"] for r in mine})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"batch {result['batch']}, {result['threads']} threads, {result['machine']['cpu']}", fontsize="small")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120))
    plt.close(fig)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None], force: bool = True) -> None:
    from ._io import write_atomic

    write_atomic(os.fspath(path), write, force=force)


def write_json(data: Any, path: str | os.PathLike, indent: int | None = 1, force: bool = True) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, separators=None if indent else (",", ":"))
            f.write("\n")

    _atomic_write(path, write, force)


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """Register ``xsurgery bench``."""
    from ._args import add_trust_args

    p = subparsers.add_parser("bench", help="time a model's X variants against dense and grouped (ratios)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="torchvision/timm name, import path or checkpoint")
    p.add_argument("--compress", type=float, nargs="+", required=True, help="one or more compressions C")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeat", type=int, default=15, help="timed rounds (median and IQR over these)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ort-layout", choices=ORT_LAYOUTS, default="auto",
                   help="auto: export every variant as `xsurgery export` does; fixed: gather/dense, faster")
    p.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N", help="e.g. 3 224 224")
    from ._args import _input_arg

    p.add_argument("--input", action="append", default=None, metavar="[NAME=]SHAPE[:DTYPE]", type=_input_arg,
                   help="an example input, repeatable (e.g. 1x128:int64); replaces --batch/--input-size")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT.json")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="latency ratio vs compression (matplotlib)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--force", action="store_true", help="overwrite --json/--plot files")
    add_trust_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from ._args import load_options
    from ._io import check_output

    for out in (args.json_out, args.plot):
        if out:
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
                   show_progress=sys.stderr.isatty(), load_options=load_options(args))
    print_table(result)
    if args.markdown:
        print(markdown_table(result))
    if args.json_out:
        write_json(result, args.json_out, force=args.force)
    if args.plot:
        plot(result, args.plot)
    return 0
