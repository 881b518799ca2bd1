"""Static int8 quantization of an exported file (``export_onnx(quantize="int8")``).

The float file is exported and verified first; then ONNX Runtime's ``quantize_static`` writes
QDQ int8 (``QuantizeLinear``/``DequantizeLinear`` around every Conv/Gemm/MatMul, weights int8
per output channel, activations per tensor), with the parameters ORT's documentation gives for
CPUs: ``QUInt8`` activations and ``QInt8`` weights on x86-64 (``reduce_range`` on CPUs without
VNNI), ``QInt8`` for both elsewhere. Activation ranges (MinMax) come from calibration batches:
a recipe's training images (the CLI builds them) or, with a warning, random inputs.

The Gather of each X-layer is kept in float or in int8, whichever of the two files verifies
and runs faster (``gather="auto"``; ties go to int8); the choice and its timings are in the
file's ``xsurgery.int8`` metadata. int8: the ``DequantizeLinear -> Gather -> QuantizeLinear``
around it share one scale, so the runtime drops the pair and gathers the int8 tensor; float:
the Gather is left out of quantization, runs on the dequantized tensor and its output is
quantized again with its own calibrated range for the Conv after it.

Verification runs the int8 and the float file in the same runtime on the calibration batches
and the verification input: max abs error, error relative to ``max|float output|`` (fails
above ``rtol``, default :data:`INT8_RTOL`) and the agreement of the argmax over the last axis
of the first output (warns below :data:`MIN_AGREEMENT`). Given labelled test batches, it
measures float and int8 top-1 in the runtime and fails when int8 loses more than
``max_top1_drop`` points (default :data:`MAX_TOP1_DROP`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..errors import UserError
from .runtimes import Runtime

QUANTIZE = ("int8",)  # export_onnx(quantize=...) / --quantize
GATHER_CHOICES = ("auto", "int8", "float")
INT8_RTOL = 0.1  # int8 vs float: max abs error / max|float output|
MIN_AGREEMENT = 0.9  # argmax agreement below this warns (near-tied outputs of random weights flip)
MAX_TOP1_DROP = 1.0  # points of top-1 int8 may lose against float on a test split
RANDOM_BATCHES = 8  # calibration batches when none are given
GATHER_TIMING_S = 0.5  # per candidate (int8 / float Gather), interleaved
GATHER_MARGIN = 0.97  # float Gather is kept only when faster than int8 by this factor
VERIFY_BATCHES = 4  # calibration batches the int8 file is also compared on


def check_quantize(quantize: str | None, gather: str, rtol: float, max_top1_drop: float) -> None:
    """One-line errors for the arguments that need no model."""
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"unknown quantization {quantize!r}; use --quantize {' or '.join(QUANTIZE)} (or leave it out "
                        f"for float32)")
    if gather not in GATHER_CHOICES:
        raise UserError(f"unknown int8 gather choice {gather!r}; use one of {', '.join(GATHER_CHOICES)}")
    if not rtol > 0 or not max_top1_drop >= 0:
        raise UserError(f"--int8-rtol must be > 0 and --max-top1-drop >= 0, got {rtol}/{max_top1_drop}")


def cpu_settings() -> dict[str, Any]:
    """ORT's recommended types for this CPU: x86-64 U8S8 (reduce_range without VNNI), else S8S8."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    vnni = False
    if x86:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                vnni = any("vnni" in line for line in f if line.startswith("flags"))
        except OSError:
            vnni = True  # not Linux: assume a current CPU
    return {"activation_type": "QUInt8" if x86 else "QInt8", "weight_type": "QInt8",
            "reduce_range": x86 and not vnni, "per_channel": True}


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's quantizer logs advice on the root logger ("consider pre-processing"): silence it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """ORT's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def x_gathers(model: Any, layers: Iterable[str]) -> list[str]:
    """The Gather nodes an X-layer's export holds (by the node's name scope)."""
    from ..analysis import onnx_layer_of

    names = set(layers)
    return [n.name for n in model.graph.node if n.op_type == "Gather" and onnx_layer_of(n.name, names)]


def _preprocess(src: str, dst: str, log: Callable[..., Any]) -> str:
    """ORT's pre-processing (shape inference, basic graph optimisation; node names kept): ``dst``,
    or ``src`` unchanged when it cannot (the quantizer then infers shapes itself).

    It runs in ``dst``'s folder: when ORT's symbolic shape inference gives up it dumps
    ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` file into the working directory, which
    must not be the user's."""
    from onnxruntime.quantization import quant_pre_process

    src, dst = os.path.abspath(src), os.path.abspath(dst)
    for kwargs in ({}, {"skip_symbolic_shape": True}):
        try:
            with _quiet_ort(), contextlib.chdir(os.path.dirname(dst)):
                quant_pre_process(src, dst, **kwargs)
            return dst
        except Exception as exc:  # noqa: BLE001 - ORT's own errors; quantizing without it still works
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    log(f"int8: ORT pre-processing failed ({why}); quantizing the exported graph as it is")
    return src


def _quantize_one(src: str, dst: str, feeds: list[dict[str, np.ndarray]], exclude: list[str], cache: str,
                  settings: dict[str, Any]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet_ort():
        quantize_static(src, dst, _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=settings["per_channel"],
                        reduce_range=settings["reduce_range"],
                        activation_type=getattr(QuantType, settings["activation_type"]),
                        weight_type=getattr(QuantType, settings["weight_type"]),
                        nodes_to_exclude=exclude or None, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=cache)


def _compare(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    """Max abs error, relative to max|ref|, and argmax agreement (last axis of output 0) over batches."""
    abs_err, scale, agree, rows = 0.0, 0.0, 0, 0
    for r_outs, g_outs in zip(ref, got):
        for i, (r, g) in enumerate(zip(r_outs, g_outs)):
            r64, g64 = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
            if r64.shape != g64.shape:
                raise UserError(f"the int8 file's output {i} has shape {g64.shape}, the float file's {r64.shape}")
            if not np.isfinite(g64).all():
                raise UserError(f"the int8 file's output {i} holds NaN/inf; check the calibration data")
            if r64.size:
                abs_err = max(abs_err, float(np.abs(g64 - r64).max()))
                scale = max(scale, float(np.abs(r64).max()))
        r0, g0 = np.asarray(r_outs[0]), np.asarray(g_outs[0])
        if r0.ndim >= 1 and r0.shape[-1] > 1 and np.issubdtype(r0.dtype, np.floating):
            agree += int((r0.argmax(-1) == g0.argmax(-1)).sum())
            rows += r0.size // r0.shape[-1]
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
    return {"max_abs_err": abs_err, "max_rel_err": rel, "argmax_agreement": agree / rows if rows else 1.0,
            "argmax_rows": rows}


def quantize_file(float_path: str, out_path: str, *, calibration: list[dict[str, np.ndarray]], random: bool,
                  verify_feeds: list[dict[str, np.ndarray]], layers: list[str], gather: str, rt: Runtime,
                  threads: int | None, rtol: float, verify: bool, log: Callable[..., Any],
                  evaluate: Callable[[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Quantize the verified float file ``float_path`` to ``out_path`` (int8 QDQ, its metadata
    added); returns the ``xsurgery.int8`` record (the Gather choice, the errors, and what
    ``evaluate(int8 file)`` adds: the test top-1)."""
    import onnx

    settings = cpu_settings()
    folder = tempfile.mkdtemp(prefix="xsurgery-int8-")
    try:
        src = _preprocess(float_path, os.path.join(folder, "pre.onnx"), log)
        gathers = x_gathers(onnx.load(src, load_external_data=False), layers)
        if not gathers:
            candidates = {"none": []}
        elif gather == "auto":
            candidates = {"int8": [], "float": gathers}
        else:
            candidates = {gather: [] if gather == "int8" else gathers}
        cache = os.path.join(folder, "calibration.json")
        files = {}
        for name, exclude in candidates.items():
            files[name] = os.path.join(folder, f"{name}.onnx")
            try:
                _quantize_one(src, files[name], calibration, exclude, cache, settings)
            except Exception as exc:  # noqa: BLE001 - the quantizer's own errors, one line
                text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UserError(f"ONNX Runtime could not quantize the exported model to int8: {text}; export it "
                                f"without --quantize") from exc
        float_sess = rt.verify_session(float_path, threads)
        ref = [rt.run(float_sess, f) for f in verify_feeds]
        errors = {name: _compare(ref, [rt.run(rt.verify_session(p, threads), f) for f in verify_feeds])
                  for name, p in files.items()} if verify else {}
        ok = [n for n in files if not verify or errors[n]["max_rel_err"] <= rtol]
        if not ok:
            best = min(errors, key=lambda n: errors[n]["max_rel_err"])
            e = errors[best]
            how = "calibrate on real data (--calibration RECIPE)" if random else "calibrate on more batches"
            raise UserError(f"the int8 file differs from the float one: max rel err {e['max_rel_err']:.3g} > "
                            f"--int8-rtol {rtol:g} (max abs err {e['max_abs_err']:.3g}); {how}, or raise "
                            f"--int8-rtol; nothing written")
        timings = {}
        if len(ok) > 1:
            from ._ort import _time_sessions

            sessions = [rt.session(files[n], threads) for n in ok]
            ms = _time_sessions(sessions, verify_feeds[-1], budget_s=GATHER_TIMING_S * len(ok), min_reps=10)
            timings = {n: round(t, 4) for n, t in zip(ok, ms)}
            pick = "float" if timings["float"] < GATHER_MARGIN * timings["int8"] else "int8"
            del sessions
            log(f"int8: Gather in int8 {timings['int8']:.3f} ms, in float {timings['float']:.3f} ms "
                f"({rt.label}, median); keeping the Gather in {pick}")
        else:
            pick = ok[0]
            if len(files) > 1:
                log(f"int8: only the file with the Gather in {pick} verifies; keeping it")
        record = {"gather": pick, **settings, "format": "QDQ", "calibration": "random" if random else "data",
                  "calibration_batches": len(calibration), "gather_timings_ms": timings, "rtol": rtol}
        if verify:
            e = errors[pick]
            record.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()})
            shapes = ", ".join(str(list(next(iter(f.values())).shape)) for f in verify_feeds[:2])
            log(f"int8 vs float ({len(verify_feeds)} batches, {shapes}, ...): max abs err {e['max_abs_err']:.3g}, "
                f"max rel err {e['max_rel_err']:.3g} (tolerance {rtol:g}), argmax agreement "
                f"{100 * e['argmax_agreement']:.1f}% of {e['argmax_rows']} rows")
            if e["argmax_rows"] and e["argmax_agreement"] < MIN_AGREEMENT:
                warnings.warn(f"int8 and float agree on the argmax of only {100 * e['argmax_agreement']:.1f}% of "
                              f"{e['argmax_rows']} rows (below {100 * MIN_AGREEMENT:.0f}%)"
                              + ("; random calibration: pass --calibration RECIPE" if random else ""), stacklevel=3)
        if evaluate is not None:
            record.update(evaluate(files[pick]))
        proto = onnx.load(files[pick])
        for k, v in (("xsurgery.quantize", "int8"), ("xsurgery.int8", json.dumps(record, separators=(",", ":")))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, out_path)
        del proto
        onnx.checker.check_model(out_path)
        return record
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def top1(rt: Runtime, float_path: str, int8_path: str, threads: int | None,
         batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray]]) -> dict[str, Any]:
    """Float and int8 top-1 (percent) of labelled batches, both run in ``rt``."""
    fs, qs = rt.verify_session(float_path, threads), rt.verify_session(int8_path, threads)
    n = hit_f = hit_q = 0
    for feed, labels in batches:
        f, q = np.asarray(rt.run(fs, feed)[0]), np.asarray(rt.run(qs, feed)[0])
        labels = np.asarray(labels).reshape(-1)
        if f.ndim != 2 or f.shape[0] != labels.shape[0]:
            raise UserError(f"top-1 needs a classifier output [batch, classes]; the model gives {list(f.shape)} for "
                            f"{labels.shape[0]} labels")
        hit_f += int((f.argmax(1) == labels).sum())
        hit_q += int((q.argmax(1) == labels).sum())
        n += labels.shape[0]
    if not n:
        raise UserError("the test split has no images; check the recipe's data section")
    return {"test_images": n, "float_top1": round(100 * hit_f / n, 4), "int8_top1": round(100 * hit_q / n, 4),
            "top1_diff": round(100 * (hit_q - hit_f) / n, 4)}


# ----------------------------------------------------------------------------- export's phase


def _feeds(batches: Iterable[Any], prep: Any, what: str) -> Iterator[dict[str, np.ndarray]]:
    """Each batch (a tensor, tuple or dict, as ``example_inputs``) as the file's feed; the
    shapes checked against the example (batch and dynamic axes free), a static batch re-cut."""
    from ..models import flat_tensors, normalize

    ref = dict(zip(prep.in_names, prep.flat))
    for i, batch in enumerate(batches):
        flat = flat_tensors(normalize(batch))
        if len(flat) != len(prep.in_names):
            raise UserError(f"{what} batch {i} holds {len(flat)} tensors; the model takes {len(prep.in_names)} "
                            f"({', '.join(prep.in_names)})")
        feed = {}
        for name, t in zip(prep.in_names, flat):
            want = ref[name]
            free = set(prep.in_axes.get(name, {})) if prep.dynamic else set()
            if t.dim() != want.dim() or any(a != b for k, (a, b) in enumerate(zip(t.shape, want.shape))
                                            if k not in free and k != 0):
                raise UserError(f"{what} batch {i}: input {name} has shape {list(t.shape)}, the model was exported "
                                f"for {list(want.shape)} (batch free); use data of the model's input size")
            feed[name] = t.detach().cpu().to(want.dtype).numpy()
        if prep.dynamic:
            yield feed
            continue
        n, step = len(next(iter(feed.values()))), int(prep.shape[0])
        for start in range(0, n - step + 1, step):  # a static batch: whole chunks of it
            yield {k: v[start:start + step] for k, v in feed.items()}


def _random_calibration(prep: Any) -> list[dict[str, np.ndarray]]:
    from ..models import flat_tensors, resample

    batch = 8 if prep.dynamic else int(prep.shape[0])

    def shape_fn(_name: str, t: Any) -> list[int]:
        return [batch, *t.shape[1:]] if t.dim() else list(t.shape)

    return [dict(zip(prep.in_names, (t.numpy() for t in flat_tensors(resample(prep.example, seed=100 + i,
                                                                                 shape_fn=shape_fn)))))
            for i in range(RANDOM_BATCHES)]


def int8_phase(prep: Any, rt: Runtime, threads: int | None, float_path: str, out_path: str, *,
               calibration: Iterable[Any] | None, test_data: Iterable[tuple[Any, Any]] | None, gather: str,
               rtol: float, max_top1_drop: float, verify: bool, log: Callable[..., Any]) -> dict[str, Any]:
    """Export's int8 phase: calibration feeds (given, or random with a warning), the quantized
    file at ``out_path``, its comparison with the float file and, given test data, top-1."""
    from ..models import flat_tensors

    if calibration is None:
        feeds = _random_calibration(prep)
        warnings.warn("int8 calibration on random inputs: activation ranges may not match real data; pass "
                      "--calibration RECIPE (calibration= in Python)", stacklevel=3)
        log(f"int8: calibrating on {len(feeds)} random batches (no calibration data given)")
    else:
        feeds = list(_feeds(calibration, prep, "calibration"))
        if not feeds:
            raise UserError("the calibration data holds no batches (of the export's static batch); give more images")
        log(f"int8: calibrating on {len(feeds)} batches ({sum(len(next(iter(f.values()))) for f in feeds)} samples)")
    verify_feeds = feeds[:VERIFY_BATCHES]
    # random calibration: export's own random verification input too (another batch / sequence
    # length); real data's ranges do not cover random inputs, so that comparison would say nothing
    if calibration is None and prep.ref is not None:
        verify_feeds.append(dict(zip(prep.in_names, (t.numpy() for t in flat_tensors(prep.example_v)))))
    evaluate = None
    if test_data is not None:
        def evaluate(int8_file: str) -> dict[str, Any]:
            acc = top1(rt, float_path, int8_file, threads, _labelled(test_data, prep))
            log(f"int8 top-1 on {acc['test_images']} test images ({rt.label}): float {acc['float_top1']:.2f}%, "
                f"int8 {acc['int8_top1']:.2f}% ({acc['top1_diff']:+.2f} points; allowed -{max_top1_drop:g})")
            if acc["top1_diff"] < -max_top1_drop:
                raise UserError(f"int8 top-1 is {-acc['top1_diff']:.2f} points below float ({acc['int8_top1']:.2f}% "
                                f"vs {acc['float_top1']:.2f}%), more than --max-top1-drop {max_top1_drop:g}; "
                                f"calibrate on more batches or raise --max-top1-drop; nothing written")
            return {**acc, "max_top1_drop": max_top1_drop}

    return quantize_file(float_path, out_path, calibration=feeds, random=calibration is None,
                         verify_feeds=verify_feeds, layers=[n for n, _ in prep.layers], gather=gather, rt=rt,
                         threads=threads, rtol=rtol, verify=verify, log=log, evaluate=evaluate)


def _labelled(test_data: Iterable[tuple[Any, Any]], prep: Any) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feed, labels) per test batch; a static batch re-cut with its labels."""
    for x, labels in test_data:
        labels = np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels).reshape(-1)
        feeds = list(_feeds([x], prep, "test"))
        if prep.dynamic:
            yield feeds[0], labels
            continue
        step = int(prep.shape[0])
        for i, feed in enumerate(feeds):
            yield feed, labels[i * step:(i + 1) * step]
