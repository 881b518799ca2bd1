"""The export driver: :func:`export_onnx`, in phases.

Check the arguments -> prepare (run the model, record each X-layer's input shapes, the
verification input) -> choose layouts (``auto``: per layer, then the whole model) -> trace
(the file with its metadata, checked) -> verify -> time (``benchmark=True``) -> replace.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._util.copying import deepcopy_model, uncompiled
from .._util.io import check_output, os_error, replace_from_temp, temp_beside
from ..errors import UserError
from . import _ort, _quantize
from ._forms import _inner_shapes, _run_recording, _with_layouts, _x_layers, forms_of, takes_inner_shape
from ._meta import _metadata
from ._trace import (
    _dynamic_axes,
    _flat_outputs,
    _FlatInputs,
    _plain,
    _torch_export,
    explain_failure,
    needs_flat_outputs,
    prepare_for_export,
)
from ._verify import _feed, _to_cpu, _verify
from .runtimes import Runtime, get_runtime

LAYOUTS = ("auto", "gather", "matmul", "dense")
DEFAULT_OPSET = 18  # read by every ORT of the last years; Gather/Conv/MatMul gain nothing from newer ones
MAX_OPSET = 23  # the newest the TorchScript exporter writes (torch 2.14)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured.

    ``max_rel_err`` is ``max|y_ort - y_torch| / max|y_torch|`` (the error relative to the
    output's scale, over all outputs); verification fails when
    ``max_abs_err > atol + rtol * max|y_torch|``. Latencies are ORT medians in milliseconds.
    """

    path: str
    layout: str
    layers: dict[str, str] = field(default_factory=dict)
    layer_timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    input_names: list[str] = field(default_factory=lambda: ["input"])
    dynamic_batch: bool = True
    opset: int = DEFAULT_OPSET
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    model_timings_ms: dict[str, float] = field(default_factory=dict)  # auto's whole-model medians
    auto_pick: str | None = None  # all-dense, all-gather or per-layer choices
    runtime: str = "onnxruntime"  # where auto timed, and the file was verified and benchmarked
    verified_on: str = "the model"
    quantize: str | None = None  # "int8": the file is QDQ int8 (the float errors above are the float file's)
    int8: dict[str, Any] | None = None  # the int8 record (also the file's xsurgery.int8 metadata)

    @property
    def latency_ratio(self) -> float | None:
        """Exported / dense latency (< 1: the export is faster)."""
        if self.latency_ms is None or not self.dense_latency_ms:
            return None
        return self.latency_ms / self.dense_latency_ms


def export_onnx(
    model: nn.Module,
    path: str,
    *,
    input_size=None,
    example_inputs: Any = None,
    layout: str = "auto",
    opset: int | None = None,
    static_batch: int | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    benchmark: bool = False,
    force: bool = False,
    threads: int | None = None,
    runtime: str = "onnxruntime",
    verbose: bool = True,
    allow_nonfinite: bool = False,
    quantize: str | None = None,
    calibration: Iterable[Any] | None = None,
    test_data: Iterable[tuple[Any, Any]] | None = None,
    int8_gather: str = "auto",
    int8_rtol: float = _quantize.INT8_RTOL,
    max_top1_drop: float = _quantize.MAX_TOP1_DROP,
) -> ExportResult:
    """Export ``model`` (X-layers or none) to ONNX, check it, verify it in ORT, write ``path``.

    Args:
        model: any module the TorchScript exporter handles; not modified.
        path: output ``.onnx`` file, written atomically (temp file + rename) only on success.
        input_size: ``H``, ``(H, W)`` or ``(C, H, W)`` (the feature size / length for models
            starting with a Linear / Conv1d / Embedding); default the model's own example.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
            (or ``--input`` spec strings): the ONNX inputs, named after ``forward``'s parameters
            or the dict keys (a lone tensor is ``input``), with their dtypes; axis 0 is a
            dynamic batch and axis 1 of integer inputs a dynamic sequence. The verification
            runs at twice the batch and half the sequence length.
        layout: ``gather``, ``matmul`` (XLinear as a batched MatMul, the other X-layers gather),
            ``dense`` or ``auto`` (time every form per layer and the whole model, keep the fastest).
        opset: ONNX opset (default :data:`DEFAULT_OPSET`).
        static_batch: fix the batch size to this; default a dynamic batch axis.
        verify: run the file in ORT on a random input and compare with torch (eval mode).
        rtol: fail when ``max|y_ort - y_torch| > atol + rtol * max|y_torch|``.
        atol: absolute floor of that tolerance (matters only for outputs near zero).
        benchmark: also time the dense original exported the same way (ratio in this run).
        force: overwrite an existing ``path``.
        threads: intra-op threads for timing and verification (default: the runtime's).
        runtime: ``onnxruntime`` or ``openvino``: the runtime ``auto`` times its candidates in,
            and where the file is verified and benchmarked (OpenVINO: optional dependency).
        verbose: print per-layer choices, errors and latencies.
        allow_nonfinite: export NaN/inf weights instead of refusing them (verification
            still fails on non-finite outputs; pass ``verify=False`` too).
        quantize: ``"int8"``: the verified float file is quantized (static QDQ, ONNX Runtime's
            quantizer, weights per channel) and the int8 file is written instead (see
            :mod:`xsurgery.export._quantize`).
        calibration: int8: an iterable of input batches (each a tensor, tuple or dict, as
            ``example_inputs``) calibrating the activation ranges; None: random inputs, with a
            warning.
        test_data: int8: an iterable of ``(inputs, labels)`` batches: float and int8 top-1 are
            measured in the runtime and the export fails when int8 loses more than
            ``max_top1_drop`` points.
        int8_gather: ``auto`` (each X-layer's Gather in int8 or float, whichever verifies and
            runs faster), ``int8`` or ``float``.
        int8_rtol: int8 fails when ``max|y_int8 - y_float| > int8_rtol * max|y_float|``.
        max_top1_drop: points of top-1 the int8 file may lose on ``test_data``.

    Verification fails on NaN/inf in either output. When the outputs are the same for every
    input (a zero-initialised head), it says so and verifies a copy whose all-zero
    parameters are filled randomly, exported with the same layouts.

    Raises:
        UserError: bad arguments, non-finite weights, an op without an ONNX form (named
            with its layer), or a verification above tolerance (no file is left behind).
    """
    onnx = _import_onnx()
    log = print if verbose else (lambda *a, **k: None)
    rt, opset = _check_arguments(runtime, layout, opset, static_batch, rtol, atol)
    _quantize.check_quantize(quantize, int8_gather, int8_rtol, max_top1_drop)
    if quantize and benchmark:
        raise UserError("--benchmark times the float file; time int8 files with xsurgery bench MODEL --quantize int8")
    path = os.fspath(path)
    check_output(path, force=force)  # exists without --force, a folder, a missing or read-only folder

    prep = _prepare(model, example_inputs, input_size, static_batch, opset, verify, allow_nonfinite)
    result = ExportResult(path=path, layout=layout, input_shape=prep.shape, input_names=prep.in_names,
                          dynamic_batch=prep.dynamic, opset=opset, runtime=runtime, quantize=quantize)
    dense_sess = _choose_layouts(prep, layout, rt, threads, result, log)
    tmp = temp_beside(path)
    int8_tmp = temp_beside(path) if quantize else None
    try:
        _trace(onnx, prep, model, result, tmp, log)
        if benchmark and dense_sess is None:
            dense_sess = rt.session(prep.to_bytes(dict.fromkeys(result.layers, "dense")), threads)
        sess = rt.session(tmp, threads)
        if verify:
            _verify(prep, rt, sess, tmp, threads, rtol, atol, result, log)
        if benchmark:
            _time(rt, sess, dense_sess, prep.feed, result, log)
        del sess, dense_sess
        if int8_tmp is not None:
            result.int8 = _quantize.int8_phase(prep, rt, threads, tmp, int8_tmp, calibration=calibration,
                                               test_data=test_data, gather=int8_gather, rtol=int8_rtol,
                                               max_top1_drop=max_top1_drop, verify=verify, log=log)
        replace_from_temp(int8_tmp or tmp, path, force)
    except OSError as exc:  # the disk filled up, the folder went read-only: one line, no file
        raise os_error(path, exc) from exc
    finally:
        for t in (tmp, int8_tmp):
            if t is not None and os.path.exists(t):
                os.remove(t)
    log(f"wrote {path}")
    return result


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise UserError("export needs onnx and onnxruntime: pip install 'xsurgery[onnx]'") from exc
    return onnx


def _check_arguments(runtime: str, layout: str, opset: int | None, static_batch: int | None, rtol: float,
                     atol: float) -> tuple[Runtime, int]:
    """The runtime (installed) and the opset, after the arguments that need no model are checked."""
    rt = get_runtime(runtime)
    rt.check_installed()
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 7 <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be between 7 and {MAX_OPSET}, got {opset}")
    if static_batch is not None and (isinstance(static_batch, bool) or int(static_batch) < 1):
        raise UserError(f"--static-batch must be a positive integer, got {static_batch}")
    if not rtol >= 0 or not atol >= 0:
        raise UserError(f"--rtol/--atol must be >= 0, got {rtol}/{atol}")
    return rt, opset


@dataclass
class _Prepared:
    """The model in eval mode on the CPU, its example and what running it recorded: the trace's input."""

    base: nn.Module
    layers: list[tuple[str, nn.Module]]  # the X-layers (name, module)
    example: tuple  # (args, kwargs)
    example_v: tuple  # the verification input: twice the batch, half the sequence of a dynamic export
    flat: list[torch.Tensor]  # the example's tensors: the ONNX inputs
    in_names: list[str]
    in_axes: dict[str, dict[int, str]]
    dynamic: bool
    opset: int
    out: Any  # the model's output on the example
    ref: Any  # ... on the verification input (None when neither verified nor needed)
    shapes: dict[str, list[tuple]]  # the input shapes each X-layer saw
    inner: dict[str, tuple | str | None]  # see _forms._inner_shapes
    cache: str | None = None  # how a generative model's cache is exported (ONNX metadata xsurgery.cache)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.flat[0].shape)

    @property
    def feed(self) -> dict[str, Any]:
        return _feed(self.in_names, self.flat)

    @property
    def n_out(self) -> int:
        return len(_flat_outputs(self.out))

    def export_to(self, choice: dict[str, str], f: Any, model: nn.Module | None = None) -> None:
        """Export ``model`` (default the prepared one) with the layouts ``choice`` to ``f``."""
        model = self.base if model is None else model
        flatten = needs_flat_outputs(self.out)
        plain = _plain(self.example) and not flatten
        prefix = "" if plain else "model."
        exported = model if plain else _FlatInputs(model, self.example, flatten)
        module = _with_layouts(exported, {prefix + k: v for k, v in choice.items()},
                               {prefix + k: v for k, v in self.inner.items()})
        try:
            _torch_export(module, tuple(self.flat), f, self.opset, self.dynamic, self.n_out, self.in_names,
                          self.in_axes)
        except UserError as exc:
            raise explain_failure(exc, choice, lambda dense: self.to_bytes(dense, model)) from exc

    def to_bytes(self, choice: dict[str, str], model: nn.Module | None = None) -> bytes:
        buf = io.BytesIO()
        self.export_to(choice, buf, model)
        return buf.getvalue()


def _prepare(model: nn.Module, example_inputs: Any, input_size: Any, static_batch: int | None, opset: int,
             verify: bool, allow_nonfinite: bool) -> _Prepared:
    """Copy the model, resolve its example, run it recording each X-layer's input shapes."""
    from ..models import flat_tensors, input_names, resample, resolve

    base = deepcopy_model(uncompiled(model)).cpu().eval()  # a torch.compile'd model: the module it wraps
    cache = prepare_for_export(base)
    if not allow_nonfinite:
        from ..checkpoint import check_finite

        check_finite({**dict(base.named_parameters()), **dict(base.named_buffers())}, "export")
    layers = _x_layers(base)
    example = resolve(base, example_inputs, input_size, batch=int(static_batch or 1))
    if example is None:
        raise UserError("export needs an example input for this model: pass --input SHAPE[:DTYPE] (or "
                        "--input-size; example_inputs= in Python)")
    example = _to_cpu(example)
    dynamic = static_batch is None
    flat = flat_tensors(example)
    in_names = input_names(base, example)
    in_axes = _dynamic_axes(example, in_names, flat)
    names = [n for n, _ in layers]
    out, shapes = _run_recording(base, example, names)
    if not _flat_outputs(out):
        raise UserError("the model returns no tensors; nothing to export")
    # the verification input: twice the batch and half the sequence of a dynamic export, to
    # exercise its dynamic axes
    by_name = dict(zip(in_names, flat))

    def verify_shape(name: str, t: torch.Tensor) -> list[int]:
        key = next((n for n, v in by_name.items() if v is t), None)
        new = list(t.shape)
        for axis in in_axes.get(key, {}) if dynamic else {}:
            new[axis] = 2 * new[axis] if axis == 0 else max(1, new[axis] // 2)
        return new

    example_v = resample(example, seed=1, shape_fn=verify_shape)
    ref, shapes_v = None, None
    if verify or (dynamic and takes_inner_shape(layers)):
        ref, shapes_v = _run_recording(base, example_v, names, varied=dynamic)
    # other values of the same shape: the layers whose row count depends on them
    same = _run_recording(base, resample(example, seed=2), names)[1] if takes_inner_shape(layers) else None
    inner = _inner_shapes(layers, shapes, shapes_v if dynamic else None, same)
    return _Prepared(base, layers, example, example_v, flat, in_names, in_axes, dynamic, opset, out, ref, shapes, inner,
                     cache)


def _choose_layouts(prep: _Prepared, layout: str, rt: Runtime, threads: int | None, result: ExportResult,
                    log: Callable[..., Any]) -> Any:
    """Set ``result.layers`` (and auto's timings); ``auto`` returns its all-dense session, else None.

    ``auto`` times gather vs dense per X-layer, then the whole model as all-dense, all-gather
    and the per-layer mix: layers timed alone miss cache effects and the runtime's layout
    changes between them. The whole model is timed as ``xsurgery bench`` times (same session
    options, threads and batch).
    """
    layers = prep.layers
    if not (layout == "auto" and layers):
        result.layers = {n: (layout if layout in forms_of(m) else "gather") for n, m in layers}
        return None
    log(f"timing each X-layer's forms (gather, dense, ...) in {rt.label} (batch {prep.shape[0]}):")
    choices, result.layer_timings_ms = _ort._per_layer_choices(layers, prep.shapes, prep.inner, prep.opset,
                                                               threads, log, rt.session)
    candidates = {"all-dense": dict.fromkeys(choices, "dense"), "all-gather": dict.fromkeys(choices, "gather")}
    # an alternative form (XLinear's matmul) for every layer that has it, gather for the others
    others = dict.fromkeys(f for _, m in layers for f in forms_of(m) if f not in ("gather", "dense"))
    for form in others:
        candidates[f"all-{form}"] = {n: (form if form in forms_of(m) else "gather") for n, m in layers}
    if choices not in candidates.values():
        candidates["per-layer choices"] = choices
    sessions = [rt.session(prep.to_bytes(choice), threads) for choice in candidates.values()]
    cmp = _ort.compare_sessions(list(candidates), sessions, prep.feed, dense=0)
    pick = cmp.names[cmp.pick]
    log(f"whole model ({cmp.rounds} rounds): " + ", ".join(
        f"{k} {t:.3f} ms" + (f" (beats all-dense in {100 * w:.0f}% of rounds)" if k != "all-dense" else "")
        for k, t, w in zip(cmp.names, cmp.median_ms, cmp.wins_vs_dense)) + f"; keeping {pick}: {cmp.reason}")
    result.model_timings_ms = {k: round(t, 4) for k, t in zip(cmp.names, cmp.median_ms)}
    result.auto_pick = pick
    result.layers = candidates[pick]
    return sessions[0]


def _trace(onnx: Any, prep: _Prepared, model: nn.Module, result: ExportResult, tmp: str,
           log: Callable[..., Any]) -> None:
    """Write the file with the chosen layouts and its ``xsurgery.*`` metadata to ``tmp``; check it."""
    from ..models import describe

    choices = result.layers
    prep.export_to(choices, tmp)
    proto = onnx.load(tmp)
    inputs = describe(prep.base, prep.example) if not _plain(prep.example) else None
    for k, v in _metadata(model, prep.layers, choices, result.layout, prep.shape, prep.dynamic, prep.opset, inputs,
                          result.runtime).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    if prep.cache is not None:  # how a generative model's cache was exported
        proto.metadata_props.add(key="xsurgery.cache", value=prep.cache)
    onnx.save(proto, tmp)
    del proto
    onnx.checker.check_model(tmp, full_check=True)
    if prep.layers:
        counts = {f: sum(v == f for v in choices.values()) for f in dict.fromkeys(choices.values())}
        log(f"layout {result.layout}: " + ", ".join(f"{n} {f}" for f, n in counts.items()) + " (X-layers)")


def _time(rt: Runtime, sess: Any, dense_sess: Any, feed: dict[str, Any], result: ExportResult,
          log: Callable[..., Any]) -> None:
    """``benchmark=True``: the file's and the dense original's median latency, interleaved."""
    ms, dense_ms = _ort._time_sessions([sess, dense_sess], feed, budget_s=_ort.BENCHMARK_S, min_reps=10, warmup=5)
    result.latency_ms, result.dense_latency_ms = ms, dense_ms
    log(f"{rt.label} latency (batch {result.input_shape[0]}, median): exported {ms:.3f} ms, dense original "
        f"{dense_ms:.3f} ms, ratio {ms / dense_ms:.3f}")
