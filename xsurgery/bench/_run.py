"""The benchmark: build the variants of one model, export them, time them together, ratios to dense."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..export import Runtime, get_runtime, list_runtimes
from ._baselines import BASELINES, baseline
from ._measure import _call, count_macs, machine_info, measure, runtime_runner, torch_runner, train_runner, versions

VARIANTS = ("dense", "grouped", "x-k1", "x-k2", "x-k4", "x-exact", "masked", "default")
# what a user would prune to instead, at the X-model's MACs (opt-in: --variants ... thin tp tp8)
# x-paired: k = 2 as a natural + one permuted copy (graph="paired", exported as Conv + Conv(Gather));
# the default (graph "auto") is paired wherever a layer's sizes allow it, random elsewhere
# x-chain: k = 2 (random) with mix_points="chain" (the widest layer of each chain grouped);
# x-k1-every: k = 1 permuting at every layer (the rule before mix points); x-k1-chain: k = 1 with
# mix_points="chain" (the default before "alternate": ResNet-50's bottleneck permuted twice)
ALL_VARIANTS = VARIANTS + ("x-paired", "x-chain", "x-k1-every", "x-k1-chain") + BASELINES
BACKENDS = ("torch", "torch-train", "ort")
# opt-in: the other runtimes of xsurgery.export.runtimes (OpenVINO CPU, optional dependency),
# each variant exported with runtime= that runtime, so auto tunes it there
ALL_BACKENDS = BACKENDS + tuple(b for b in (get_runtime(n).backend for n in list_runtimes()) if b not in BACKENDS)

# convert() options per variant; "default" is convert() with no options (and export with none).
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "grouped": {"graph": "grouped"},
    "x-k1": {"mixing": 1},
    "x-k2": {"mixing": 2, "graph": "random"},  # the random expander (the default before graph auto)
    "x-k4": {"mixing": 4},
    "x-exact": {"graph": "exact"},
    "masked": {"mixing": 2, "execution": "masked"},
    "default": {},
    "x-paired": {"graph": "paired"},
    "x-chain": {"mixing": 2, "graph": "random", "mix_points": "chain"},
    "x-k1-every": {"mixing": 1, "mix_points": "every"},
    "x-k1-chain": {"mixing": 1, "mix_points": "chain"},
}



ORT_LAYOUTS = ("auto", "fixed")
# --quantize int8: the variants timed by default (dense, grouped, the default = mixing 1, and mixing 2)
INT8_VARIANTS = ("dense", "grouped", "default", "x-k2")


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


def _export_model(model: nn.Module, x: Any, path: Path, layout: str | None, threads: int | None,
                  runtime: str = "onnxruntime", quantize: str | None = None) -> str:
    """Export with ``export_onnx``'s defaults (``layout="auto"``, dynamic batch) unless a layout is given;
    ``quantize="int8"``: the int8 file (random calibration, its Gather float or int8 as export picks)."""
    from ..export import export_onnx

    kwargs: dict[str, Any] = {"example_inputs": x, "verify": False, "verbose": False, "runtime": runtime,
                              "quantize": quantize}
    if layout is not None:
        kwargs["layout"] = layout
    kwargs["threads"] = threads  # the machine's setting, not an option: auto times its layouts with it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration: timing does not depend on the ranges
        result = export_onnx(model, str(path), **kwargs)
    chosen = list((getattr(result, "layers", None) or {}).values())
    label = layout or "auto"
    if layout is None and chosen:  # what auto picked, e.g. "auto: 37/52 gather" or "auto: 60/72 matmul"
        sparse = [f for f in chosen if f != "dense"]
        counts = ", ".join(f"{sparse.count(f)}/{len(chosen)} {f}" for f in dict.fromkeys(sparse))
        label = f"auto: {counts or f'0/{len(chosen)} gather'}"
    int8 = getattr(result, "int8", None) or {}
    if int8.get("gather") in ("int8", "float"):
        label += f", {int8['gather']} Gather"
    return label


# ----------------------------------------------------------------------------- models


def _create(model: str | nn.Module, **load_options: bool) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from ..checkpoint import is_checkpoint_path, load_dense, resolve_model

    if is_checkpoint_path(model):  # its dense architecture: the variants are converted from it
        return load_dense(model, **load_options)
    return resolve_model(model, **load_options)


def _runtimes(backends: Sequence[str]) -> dict[str, Runtime]:
    """The runtime of each backend that times exported files (``ort``, ``openvino``), registry order."""
    found = (get_runtime(n) for n in list_runtimes())
    return {rt.backend: rt for rt in found if rt.backend in backends}


def _convert(model: nn.Module, compress: float, options: dict[str, Any], example) -> nn.Module:
    from ..surgery import convert

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
    backends: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    repeat: int = 15,
    input_size: Sequence[int] | None = None,
    *,
    warmup: int = 3,
    min_sample_ms: float = 5.0,
    ort_layout: str = "auto",
    show_progress: bool = False,
    load_options: dict[str, bool] | None = None,
    example_inputs: Any = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Time the variants of one model as ratios to the dense model.

    Args:
        model: a name for :func:`xsurgery.models.sources.create_model` or a module (the dense model).
        compress: one compression C or several (one dense reference serves all of them).
        batch: batch size N of the timed input ``[N, *input_size]``.
        threads: intra-op threads for torch and ONNX Runtime (default: torch's current count).
        backends: subset of :data:`ALL_BACKENDS` (``openvino``: files exported with
            ``runtime="openvino"``, so auto tunes them there, timed in OpenVINO); default
            :data:`BACKENDS` (int8: ``ort``, and ``openvino`` when installed).
        variants: subset of :data:`ALL_VARIANTS`; ``dense`` is always measured (the reference);
            default :data:`VARIANTS` (int8: :data:`INT8_VARIANTS`).
            ``thin``, ``tp`` and ``tp8`` are dense models at the ``default`` X-model's MACs
            (see :mod:`xsurgery.bench._baselines`); how each was made is in ``baselines``.
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
        quantize: ``"int8"``: every variant's file is exported int8 (``export_onnx(quantize=
            "int8")``, random calibration) and timed in the runtimes only; ratios are to int8 dense.

    Returns:
        ``{"model", "compress", "batch", "threads", "input_size", "versions", "machine",
        "macs", "results": [{"variant", "compress", "backend", "median_ms", "spread_ms",
        "min_ms", "max_ms", "ratio_to_dense", "macs_ratio", ...}]}``; ``compress`` is the
        number given, or the list when several were.
    """
    backends, variants = _defaults(backends, variants, quantize)
    backends, variants, compresses = _check_arguments(backends, variants, compress, ort_layout, batch, threads)
    with _torch_threads(threads) as threads:
        dense = _create(model, **(load_options or {})).eval()
        from ..models import describe, per_sample_size

        x = _example(dense, example_inputs, input_size, batch)
        size = per_sample_size(x)
        models, made = _build_variants(dense, x, compresses, variants)
        macs = {key: count_macs(m, x) for key, m in models.items()}
        with tempfile.TemporaryDirectory(prefix="xsurgery-bench-") as tmp:
            runners, layouts = _export(models, x, backends, Path(tmp), ort_layout, threads, quantize)
            timings = _measure_with_progress(runners, warmup, repeat, min_sample_ms, show_progress)
            del runners

    many = not isinstance(compress, (int, float))
    return {
        "model": model if isinstance(model, str) else type(model).__name__,
        "compress": compresses if many else compresses[0],
        "batch": batch,
        "threads": threads,
        "input_size": list(size),
        "inputs": describe(dense, x),
        "repeat": repeat,
        "ort_layout": ort_layout,
        **({"quantize": quantize} if quantize else {}),
        "warmup": warmup,
        "versions": versions(),
        "machine": machine_info(),
        "macs": {"dense": macs[("dense", 1.0)]},
        **({"baselines": made} if made else {}),
        "results": _results(timings, macs, layouts),
    }


def _defaults(backends: Sequence[str] | None, variants: Sequence[str] | None, quantize: str | None
              ) -> tuple[Sequence[str], Sequence[str]]:
    """The backends and variants to time: given, else the defaults (int8: the runtimes only)."""
    if quantize is None:
        return (BACKENDS if backends is None else backends), (VARIANTS if variants is None else variants)
    from ..export import QUANTIZE

    if quantize not in QUANTIZE:
        raise UserError(f"unknown --quantize {quantize!r}; use --quantize {' or '.join(QUANTIZE)}")
    if backends is None:
        import importlib.util

        backends = [b for b, rt in _runtimes(ALL_BACKENDS).items()
                    if b == "ort" or importlib.util.find_spec(rt.module) is not None]
    torch_backends = [b for b in backends if b in ("torch", "torch-train")]
    if torch_backends:
        raise UserError(f"--quantize {quantize} times exported files: drop the {', '.join(torch_backends)} "
                        f"backend(s) (use --backends ort openvino)")
    return backends, (INT8_VARIANTS if variants is None else variants)


def _check_arguments(backends: Sequence[str], variants: Sequence[str], compress: float | Sequence[float],
                     ort_layout: str, batch: int, threads: int | None
                     ) -> tuple[tuple[str, ...], tuple[str, ...], list[float]]:
    """(backends, variants, compressions), checked; the runtimes the backends time in, installed."""
    backends = _check_choices(backends, ALL_BACKENDS, "backend")
    for backend, rt in _runtimes(backends).items():
        rt.check_installed(f"the {backend} backend")
    variants = _check_choices(variants, ALL_VARIANTS, "variant")
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
    return backends, variants, compresses


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` (default: as they are) while inside; yields the count."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)


def _example(dense: nn.Module, example_inputs: Any, input_size: Sequence[int] | None, batch: int) -> Any:
    from ..models import resolve

    x = resolve(dense, example_inputs, input_size, batch=batch)
    if x is None:
        raise UserError("bench needs an example input for this model: pass --input SHAPE[:DTYPE] or --input-size")
    return x


def _build_variants(dense: nn.Module, x: Any, compresses: list[float], variants: Sequence[str]
                    ) -> tuple[dict[tuple[str, float], nn.Module], dict[str, dict[str, Any]]]:
    """Every (variant, compression)'s model (dense once, at 1.0), and how each baseline was made."""
    models: dict[tuple[str, float], nn.Module] = {("dense", 1.0): dense}
    made: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block counts rounded to divisors: expected here
        for c in compresses:
            for v in variants:
                if v != "dense" and v not in BASELINES:
                    models[(v, c)] = _convert(dense, c, VARIANT_OPTIONS[v], x).eval()
            wanted = [v for v in variants if v in BASELINES]
            if wanted:
                ref = models.get(("default", c)) or _convert(dense, c, VARIANT_OPTIONS["default"], x)
                target = count_macs(ref, x)
                for v in wanted:
                    models[(v, c)], how = baseline(v, dense, target, _tensor_or(x), lambda m: count_macs(m, x), _call)
                    made[f"{v}-{c:g}"] = how
                    models[(v, c)].eval()
    return models, made


def _export(models: dict[tuple[str, float], nn.Module], x: Any, backends: Sequence[str], tmp: Path,
            ort_layout: str, threads: int | None, quantize: str | None = None
            ) -> tuple[dict[Hashable, Callable[[], Any]], dict[tuple, str]]:
    """A runner per (variant, compression, backend); the runtime backends' files exported to ``tmp``
    first (tuned for that runtime), with the layout each got."""
    runtimes = _runtimes(backends)
    runners: dict[Hashable, Callable[[], Any]] = {}
    layouts: dict[tuple, str] = {}
    for (v, c), m in models.items():
        if "torch" in backends:
            runners[(v, c, "torch")] = torch_runner(m, x)
        if "torch-train" in backends:
            runners[(v, c, "torch-train")] = _train_runner_copy(m, x)
        for b, rt in runtimes.items():
            path = tmp / f"{v}-{c:g}-{b}.onnx"
            layouts[(v, c, b)] = _export_model(m, x, path, _ort_layout(v, ort_layout), threads, runtime=rt.name,
                                               quantize=quantize)
            runners[(v, c, b)] = runtime_runner(rt.name, path, x, threads)
    return runners, layouts


def _results(timings: dict, macs: dict[tuple[str, float], int], layouts: dict[tuple, str]) -> list[dict[str, Any]]:
    """One row per (variant, compression, backend): median, spread, ratios to dense (the layout for files)."""
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
            **({"layout": "none" if v == "dense" else layouts[(v, c, b)]} if (v, c, b) in layouts else {}),
        })
    return results


def _tensor_or(x: Any) -> Any:
    """The lone tensor of an ``(args, kwargs)`` example (what Torch-Pruning traces with), else ``x``."""
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], dict) and not x[1] and len(x[0]) == 1:
        return x[0][0]
    return x


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
