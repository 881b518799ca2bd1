"""Measuring: the machine, library versions, interleaved timing, runners per backend, MACs."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError

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

    from .._version import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "xsurgery": __version__}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "openvino", "torch-pruning"):
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


def runtime_runner(runtime: str, path: str | os.PathLike, x: Any, threads: int | None = None) -> Callable[[], Any]:
    """Inference of an exported file in a registered runtime (:func:`xsurgery.export.get_runtime`),
    with the sessions export's ``layout="auto"`` times with, on the fixed input ``x``."""
    from ..export import get_runtime
    from ..models import flat_tensors

    rt = get_runtime(runtime)
    sess = rt.session(path, threads)
    tensors = flat_tensors(x) if isinstance(x, tuple) else [x]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(rt.input_names(sess), tensors)}
    return rt.runner(sess, feed)


def ov_runner(path: str | os.PathLike, x: Any, threads: int | None = None) -> Callable[[], Any]:
    """OpenVINO CPU inference of an exported file (latency hint, one stream, its default precision)."""
    return runtime_runner("openvino", path, x, threads)


def ort_runner(path: str | os.PathLike, x: Any, threads: int | None = None) -> Callable[[], Any]:
    """ONNX Runtime CPU inference of an exported file on the fixed input ``x`` (a tensor or an example)."""
    return runtime_runner("onnxruntime", path, x, threads)


# ----------------------------------------------------------------------------- MACs


def count_macs(model: nn.Module, x: Any) -> int:
    """Multiply-accumulates of one inference at ``x``'s shape, X-layers at their compact size.

    The report's counter (:func:`xsurgery.analysis.report`): conv/linear/X-layers by shape,
    and every matmul or attention kernel elsewhere, whatever the execution.
    """
    from ..analysis import report

    return int(report(model, example_inputs=x).totals["macs_after"])
