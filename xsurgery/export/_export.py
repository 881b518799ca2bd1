"""The export driver: :func:`export_onnx` (layouts, export, metadata, verification, timing)."""

from __future__ import annotations

import copy
import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._util.io import TMP_PREFIX, check_output, os_error, remove_stale_temps
from ..errors import UserError
from ..layers import XLinear
from . import _ort, _ov
from ._forms import _inner_shapes, _run_recording, _with_layouts, _x_layers
from ._meta import _metadata
from ._ov import RUNTIMES
from ._trace import _dynamic_axes, _flat_outputs, _FlatInputs, _plain, _torch_export
from ._verify import _constant, _errors, _feed, _perturbed, _to_cpu

LAYOUTS = ("auto", "gather", "dense")
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
        layout: ``gather``, ``dense`` or ``auto`` (time both per layer, keep the faster).
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

    Verification fails on NaN/inf in either output. When the outputs are the same for every
    input (a zero-initialised head), it says so and verifies a copy whose all-zero
    parameters are filled randomly, exported with the same layouts.

    Raises:
        UserError: bad arguments, non-finite weights, an op without an ONNX form (named
            with its layer), or a verification above tolerance (no file is left behind).
    """
    try:
        import onnx
    except ImportError as exc:
        raise UserError("export needs onnx and onnxruntime: pip install 'xsurgery[onnx]'") from exc

    log = print if verbose else (lambda *a, **k: None)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        _ov.check_installed()
    make = _ort._session if runtime == "onnxruntime" else _ov.session
    rt_name = "ONNX Runtime" if runtime == "onnxruntime" else "OpenVINO"
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 7 <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be between 7 and {MAX_OPSET}, got {opset}")
    if static_batch is not None and (isinstance(static_batch, bool) or int(static_batch) < 1):
        raise UserError(f"--static-batch must be a positive integer, got {static_batch}")
    if not rtol >= 0 or not atol >= 0:
        raise UserError(f"--rtol/--atol must be >= 0, got {rtol}/{atol}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    check_output(path, force=force)  # exists without --force, a folder, a missing or read-only folder

    from ..models import describe, flat_tensors, input_names, resample, resolve

    base = copy.deepcopy(model).cpu().eval()
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
    shape = tuple(flat[0].shape)
    names = [n for n, _ in layers]
    out, shapes = _run_recording(base, example, names)
    n_out = len(_flat_outputs(out))
    if n_out == 0:
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
    if verify or (dynamic and any(isinstance(m, XLinear) for _, m in layers)):
        ref, shapes_v = _run_recording(base, example_v, names)
    inner = _inner_shapes(layers, shapes, shapes_v if dynamic else None)
    x = tuple(flat)
    exported = base if _plain(example) else _FlatInputs(base, example)
    prefix = "" if _plain(example) else "model."

    def with_layouts(choice: dict[str, str]) -> nn.Module:
        return _with_layouts(exported, {prefix + k: v for k, v in choice.items()},
                             {prefix + k: v for k, v in inner.items()})

    def export_to(module: nn.Module, f: Any) -> None:
        _torch_export(module, x, f, opset, dynamic, n_out, in_names, in_axes)

    timings: dict[str, dict[str, float]] = {}
    if layout == "auto" and layers:
        log(f"timing gather vs dense per X-layer in {rt_name} (batch {shape[0]}):")
        choices, timings = _ort._choose_layouts(layers, shapes, inner, opset, threads, log, make)
    else:
        choices = {n: ("dense" if layout == "dense" else "gather") for n, _ in layers}

    result = ExportResult(path=path, layout=layout, layers=choices, layer_timings_ms=timings,
                          input_shape=shape, input_names=in_names, dynamic_batch=dynamic, opset=opset,
                          runtime=runtime)
    # our temp-file naming (writer's pid), so a SIGKILLed export's orphan is removed later
    suffix = "-" + os.path.basename(path)[:64]
    remove_stale_temps(folder, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    except OSError as exc:
        raise os_error(path, exc) from exc
    os.close(fd)
    try:
        if not (layout == "auto" and layers):  # auto writes its pick below
            export_to(with_layouts(choices), tmp)
        feed = _feed(in_names, flat)
        dense_sess = None
        if benchmark or (layout == "auto" and layers):
            dense_bytes = io.BytesIO()
            export_to(with_layouts(dict.fromkeys(choices, "dense")), dense_bytes)
            dense_sess = make(dense_bytes.getvalue(), threads)
        if layout == "auto" and layers:
            # layers timed alone miss cache effects and the runtime's layout changes between
            # them: the whole model decides between all-dense, all-gather and the per-layer mix,
            # timed as `xsurgery bench` times (same session options, threads and batch)
            all_dense, all_gather = dict.fromkeys(choices, "dense"), dict.fromkeys(choices, "gather")
            candidates = {"all-dense": all_dense, "all-gather": all_gather}
            if choices not in (all_dense, all_gather):
                candidates["per-layer choices"] = choices
            sessions = [dense_sess]
            for choice in list(candidates.values())[1:]:
                buf = io.BytesIO()
                export_to(with_layouts(choice), buf)
                sessions.append(make(buf.getvalue(), threads))
            cmp = _ort.compare_sessions(list(candidates), sessions, feed, dense=0)
            del sessions
            pick = cmp.names[cmp.pick]
            log(f"whole model ({cmp.rounds} rounds): " + ", ".join(
                f"{k} {t:.3f} ms" + (f" (beats all-dense in {100 * w:.0f}% of rounds)" if k != "all-dense" else "")
                for k, t, w in zip(cmp.names, cmp.median_ms, cmp.wins_vs_dense)) + f"; keeping {pick}: {cmp.reason}")
            result.model_timings_ms = {k: round(t, 4) for k, t in zip(cmp.names, cmp.median_ms)}
            result.auto_pick = pick
            choices = candidates[pick]
            result.layers = choices
            export_to(with_layouts(choices), tmp)

        proto = onnx.load(tmp)
        inputs = describe(base, example) if not _plain(example) else None
        for k, v in _metadata(model, layers, choices, layout, shape, dynamic, opset, inputs, runtime).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, tmp)
        del proto
        onnx.checker.check_model(tmp, full_check=True)
        if layers:
            n_g = sum(v == "gather" for v in choices.values())
            log(f"layout {layout}: {n_g} of {len(choices)} X-layers gather, {len(choices) - n_g} dense")

        sess = make(tmp, threads)
        # OpenVINO: verify in f32 (a bf16 CPU's default precision is not what rtol measures)
        vsess = sess if runtime == "onnxruntime" else _ov.session(tmp, threads, exact=True)
        if verify:
            from ..models import call

            flat_v = flat_tensors(example_v)
            vb = list(flat_v[0].shape)
            flat_ref = _flat_outputs(ref)
            try:
                got = vsess.run(None, _feed(in_names, flat_v))
            except Exception as exc:  # onnxruntime's own error types
                text = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
                raise UserError(f"ONNX Runtime cannot run the exported model on inputs of shapes "
                                f"{[list(t.shape) for t in flat_v]} (batch/sequence changed to check the dynamic "
                                f"axes): {text}; try --static-batch") from exc
            if _constant(flat_ref, _flat_outputs(out)) and all(torch.isfinite(r).all() for r in flat_ref):
                vmodel, filled = _perturbed(base)
                with torch.no_grad():
                    flat_ref = _flat_outputs(call(vmodel, example_v))
                    still = _constant(flat_ref, _flat_outputs(call(vmodel, example)))
                if not filled or still:
                    raise UserError("the model's outputs are the same for every input, so verification compares "
                                    "nothing; check the weights (or pass --no-verify to export unverified)")
                log(f"the outputs are the same for every input; verifying a copy with {len(filled)} all-zero "
                    f"parameter(s) ({', '.join(filled[:3])}) filled randomly, exported with the same layouts")
                vexported = vmodel if _plain(example) else _FlatInputs(vmodel, example)
                vbytes = io.BytesIO()
                _torch_export(_with_layouts(vexported, {prefix + k: v for k, v in choices.items()},
                                            {prefix + k: v for k, v in inner.items()}),
                              x, vbytes, opset, dynamic, n_out, in_names, in_axes)
                got = (make(vbytes.getvalue(), threads) if runtime == "onnxruntime" else
                       _ov.session(vbytes.getvalue(), threads, exact=True)).run(None, _feed(in_names, flat_v))
                result.verified_on = "perturbed copy: " + ", ".join(filled)
            abs_err, scale, rel = _errors(flat_ref, got)
            result.max_abs_err, result.max_rel_err = abs_err, rel
            log(f"verification (input {vb}): max abs err {abs_err:.3g}, max rel err {rel:.3g} "
                f"(relative to max|output| = {scale:.3g})")
            if not abs_err <= atol + rtol * scale:
                raise UserError(f"{rt_name} output differs from torch: max abs err {abs_err:.3g} > "
                                f"atol {atol:g} + rtol {rtol:g} * max|output| {scale:.3g}; nothing written")
        if benchmark:
            ms, dense_ms = _ort._time_sessions([sess, dense_sess], feed, budget_s=_ort.BENCHMARK_S, min_reps=10, warmup=5)
            result.latency_ms, result.dense_latency_ms = ms, dense_ms
            log(f"{rt_name} latency (batch {shape[0]}, median): exported {ms:.3f} ms, dense original {dense_ms:.3f} ms, "
                f"ratio {ms / dense_ms:.3f}")
        del sess, vsess, dense_sess
        if not force and os.path.lexists(path):  # appeared while we exported: still no silent overwrite
            raise UserError(f"{path} exists; pass --force to overwrite it")
        with open(tmp, "rb+") as f:  # on disk before the rename, as every other output
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # the disk filled up, the folder went read-only: one line, no file
        raise os_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"wrote {path}")
    return result
