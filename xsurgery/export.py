"""ONNX export: each X-layer as Gather + grouped Conv (or grouped MatMul), verified in ONNX Runtime.

Per X-layer the file holds one of two forms:

* ``gather``: ``Gather(axis=1, index)`` + ``Conv(group=G)`` with the compact weight. XLinear:
  ``Reshape``/``Transpose`` to ``[1, C_in, M]``, ``Gather(axis=1)`` on the feature axis and a
  grouped 1x1 ``Conv`` (G matmuls of the compact weight), back to ``[..., C_out]``. The
  Gather is left out when the layer's index is the identity.
* ``dense``: a plain ``Conv`` / ``Gemm`` with the zero-filled dense weight (widest support).

``layout="auto"`` times both forms of every X-layer alone in ONNX Runtime on this machine
(same session options as the final model, the layer's real input shape at the export batch
size, interleaved runs, the fastest of at least 10) and keeps gather where it is at least 5 %
faster; then it times that mix against the all-dense and all-gather exports of the whole model
and keeps the fastest, so ``auto`` is never slower than either uniform layout as measured in
that run.

The graph is produced by the TorchScript exporter (``torch.onnx.export(dynamo=False)``): the
gather execution already is ``index_select`` + ``conv2d(groups=G)``, which it maps to
Gather + Conv(group). On torch 2.14 it is 10-20x faster than the dynamo exporter and keeps a
dynamic batch axis from a batch-1 example (the dynamo exporter specialises batch 1).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import UserError
from ._version import __version__
from .layers import X_LAYERS, XLinear

__all__ = ["DEFAULT_OPSET", "LAYOUTS", "ExportResult", "add_cli", "export_onnx", "read_metadata"]

LAYOUTS = ("auto", "gather", "dense")
DEFAULT_OPSET = 18  # read by every ORT of the last years; Gather/Conv/MatMul gain nothing from newer ones
MAX_OPSET = 23  # the newest the TorchScript exporter writes (torch 2.14)
# auto keeps gather only when it wins by this factor: closer than that is timing noise, and
# dense is the form every runtime supports
GATHER_MARGIN = 0.95
LAYER_TIMING_S = 0.1  # per X-layer and form, after warm-up (auto)
MODEL_TIMING_S = 1.0  # auto's whole-model check of the mix against all-dense and all-gather
BENCHMARK_S = 3.0
_META = "xsurgery."


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
    verified_on: str = "the model"

    @property
    def latency_ratio(self) -> float | None:
        """Exported / dense latency (< 1: the export is faster)."""
        if self.latency_ms is None or not self.dense_latency_ms:
            return None
        return self.latency_ms / self.dense_latency_ms


# --------------------------------------------------------------------------- layer forms


class _GatherLinear(nn.Module):
    """Export form of an XLinear: Gather on the feature axis + a grouped 1x1 Conv (a grouped matmul).

    The rows are laid out ``[1, C_in, M]`` (M = all leading positions) so that the Gather
    copies contiguous rows and the grouped Conv runs G GEMMs of ``[O/G, D] x [D, M]``; ORT's
    Gather on the innermost axis copies element by element and was up to 30x slower.
    """

    def __init__(self, layer: XLinear, inner_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.blocks, self.in_features, self.out_features = layer.blocks, layer.in_features, layer.out_features
        # the dims between batch and features when they are fixed: the output reshape then has
        # a constant shape instead of a Shape/Gather/Concat chain per layer
        self.inner_shape = inner_shape
        self.identity = bool(layer._identity)
        self.register_buffer("index", layer.index.detach().clone())
        self.register_buffer("weight", layer.weight.detach().unsqueeze(-1).clone())  # [O, D, 1]
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = (-1, *self.inner_shape) if self.inner_shape is not None else x.shape[:-1]
        rows = x.reshape(-1, self.in_features).t().unsqueeze(0)  # [1, C_in, M]
        if not self.identity:
            rows = rows.index_select(1, self.index)
        y = F.conv1d(rows, self.weight, self.bias, groups=self.blocks)  # [1, C_out, M]
        return y.squeeze(0).t().reshape(*lead, self.out_features)


def _x_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, X_LAYERS)]


def _layer_form(layer: nn.Module, layout: str, inner_shape: tuple[int, ...] | None = None) -> nn.Module:
    if layout == "dense":
        return layer.to_dense()
    if isinstance(layer, XLinear):
        return _GatherLinear(layer, inner_shape)
    layer = copy.copy(layer)  # shares parameters; only the execution attribute differs
    layer.execution = "gather"
    return layer


def _with_layouts(model: nn.Module, choices: dict[str, str], inner: dict[str, tuple[int, ...] | None]) -> nn.Module:
    out = copy.deepcopy(model)
    for name, layout in choices.items():
        if not name:  # the model is itself an X-layer
            return _layer_form(out, layout, inner.get(name))
        out.set_submodule(name, _layer_form(out.get_submodule(name), layout, inner.get(name)))
    return out


def _run_recording(model: nn.Module, example: tuple, names: list[str]) -> tuple[Any, dict[str, list[tuple]]]:
    """``model(*args, **kwargs)`` and the distinct input shapes each named layer saw."""
    from ._inputs import call, first_error_line, shapes_text

    seen: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    hooks = []
    for name in names:
        def hook(_m, args, _name=name):
            if args and isinstance(args[0], torch.Tensor) and tuple(args[0].shape) not in seen[_name]:
                seen[_name].append(tuple(args[0].shape))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = call(model, example)
    except Exception as exc:
        raise UserError(f"the model does not run on the example input ({shapes_text(example)}): "
                        f"{first_error_line(exc)}; give an input it takes (--input / --input-size)") from exc
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _inner_shapes(layers, shapes: dict, other: dict | None) -> dict[str, tuple | None]:
    """Per XLinear the fixed dims of its input between batch and features, if they are fixed.

    ``other`` holds the shapes seen at twice the batch (dynamic export): only dims that do
    not change with the batch may become constants; ``None`` (static batch) trusts them all.
    """
    inner: dict[str, tuple | None] = {}
    for n, m in layers:
        if not isinstance(m, XLinear):
            continue
        s = shapes[n]
        ok = len(s) == 1 and len(s[0]) >= 2
        if ok and other is not None:
            o = other[n]
            ok = len(o) == 1 and len(o[0]) == len(s[0]) and o[0][0] == 2 * s[0][0] and o[0][1:] == s[0][1:]
        inner[n] = tuple(s[0][1:-1]) if ok else None
    return inner


# --------------------------------------------------------------------------- exporter


class _FlatInputs(nn.Module):
    """Calls ``model`` with the example's structure from a flat list of tensors (the ONNX inputs).

    Positional inputs come first, then keyword inputs in the example's order; a list of
    tensors (torchvision detection's images) is one entry per tensor.
    """

    def __init__(self, model: nn.Module, example: tuple) -> None:
        super().__init__()
        self.model = model
        args, kwargs = example
        self.layout = [("arg", None, len(a) if isinstance(a, list) else None) for a in args]
        self.layout += [("kw", k, len(v) if isinstance(v, list) else None) for k, v in kwargs.items()]

    def forward(self, *flat: torch.Tensor) -> Any:
        args, kwargs, i = [], {}, 0
        for where, key, n in self.layout:
            value = list(flat[i:i + n]) if n is not None else flat[i]
            i += n if n is not None else 1
            if where == "arg":
                args.append(value)
            else:
                kwargs[key] = value
        return self.model(*args, **kwargs)


def _plain(example: tuple) -> bool:
    args, kwargs = example
    return len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)


def _dynamic_axes(example: tuple, names: list[str], flat: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch on axis 0 of every input; sequence on axis 1 of integer (token) inputs."""
    listed = isinstance(example[0][0], list) if example[0] else False
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(names, flat):
        if listed and name.count(".") or t.dim() == 0:  # images of a list: [C, H, W], no batch axis
            continue
        axes[name] = {0: "batch"}
        if t.dim() >= 2 and not t.dtype.is_floating_point and t.dtype != torch.bool:
            axes[name][1] = "sequence"
    return axes


def _flat_outputs(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_outputs(v)]
    return []


def _scope_of(module: nn.Module, example: torch.Tensor | tuple, op: str) -> str | None:
    """Qualified name of the module whose forward calls ``op`` (from the traced graph's scopes)."""
    trace_mod = torch.jit._trace
    previous = getattr(trace_mod, "_trace_module_map", None)
    # the tracer names a node's scope after the modules it is called from, by this map
    trace_mod._trace_module_map = {m: f"layer::{name}" for name, m in module.named_modules()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, _ = torch.jit._get_trace_graph(module, example if isinstance(example, tuple) else (example,))
    except Exception:
        return None
    finally:
        trace_mod._trace_module_map = previous
    stack = [graph]
    while stack:
        for node in stack.pop().nodes():
            if node.kind() == op:
                scope = node.scopeName()
                return scope.rsplit("::", 1)[-1] if scope else ""
            stack.extend(node.blocks())
    return None


def _export_error(exc: BaseException, opset: int, module: nn.Module, example: torch.Tensor | tuple) -> UserError:
    """One line naming the op and the layer that calls it."""
    text = str(exc)
    m = re.search(r"operator '([\w:.]+)'", text) or re.search(r"kind '([\w:.]+)'", text)
    if m is None:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return UserError(f"ONNX export failed at opset {opset}: {first[:300]}")
    op = m.group(1)
    layer = _scope_of(module, example, op)
    where = "an unknown layer" if layer is None else (f"layer {layer!r}" if layer else "the model's own forward")
    return UserError(f"cannot export to ONNX: operator {op} in {where} has no ONNX form at opset {opset} "
                     f"(replace that layer or try another --opset)")


@contextlib.contextmanager
def _quiet_exporter():
    """Keep the TorchScript exporter from dumping its IR graph to stderr when it fails.

    torch 2.14's ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``
    instead of calling it, so the exporter's log is always on.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as ts_utils
    except ImportError:  # pragma: no cover - other torch versions
        yield
        return
    original = getattr(ts_utils, "setup_onnx_logging", None)
    if original is None:  # pragma: no cover
        yield
        return
    ts_utils.setup_onnx_logging = lambda verbose: contextlib.nullcontext()
    try:
        yield
    finally:
        ts_utils.setup_onnx_logging = original
        torch._C._jit_set_onnx_log_enabled(False)


def _torch_export(module: nn.Module, example: torch.Tensor | tuple, f: Any, opset: int, dynamic: bool, n_out: int,
                 input_names: list[str] | None = None, input_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Export ``module(*example)``; ``input_axes`` are the inputs' dynamic axes (default batch on "input")."""
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    example = example if isinstance(example, tuple) else (example,)
    input_names = input_names or ["input"]
    axes = None
    if dynamic:
        axes = dict(input_axes) if input_axes is not None else {"input": {0: "batch"}}
        axes.update({n: {0: "batch"} for n in names})
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(
                module, example, f, input_names=input_names, output_names=names, dynamic_axes=axes,
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        except Exception as exc:
            if isinstance(exc, UserError):
                raise
            raise _export_error(exc, opset, module, example) from exc


def _to_bytes(module: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    _torch_export(module, example, buf, opset, dynamic=False, n_out=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- ONNX Runtime


def _session(model: str | bytes, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or 0)  # 0 = ORT's default (one per physical core)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def _time_sessions(sessions: list, feed: dict, *, budget_s: float, min_reps: int = 5, max_reps: int = 200,
                   warmup: int = 3, stat: str = "median") -> list[float]:
    """Median (or min) ms of each session, run interleaved (round robin) so drift hits all alike."""
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while True:
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t)
        n = len(times[0])
        if n >= max_reps or (n >= min_reps and time.perf_counter() - start > budget_s):
            break
    reduce = min if stat == "min" else statistics.median
    return [1e3 * reduce(t) for t in times]


def _choose_layouts(layers, shapes, inner, opset, threads, log) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Time gather vs dense of every X-layer alone (its input shape at the export batch)."""
    choices, timings = {}, {}
    gen = torch.Generator().manual_seed(1)
    for name, layer in layers:
        if not shapes[name]:  # never called in forward: nothing to time, dense is safe
            choices[name] = "dense"
            continue
        xin = torch.randn(shapes[name][0], generator=gen).to(layer.weight.dtype)
        sessions = [_session(_to_bytes(_layer_form(layer, form, inner.get(name)).eval(), xin, opset), threads)
                    for form in ("gather", "dense")]
        # min, not median: a layer runs for microseconds to milliseconds, and on a shared machine
        # one preemption is longer than that; the fastest run is what each form can do
        g_ms, d_ms = _time_sessions(sessions, {"input": xin.numpy()}, budget_s=LAYER_TIMING_S, min_reps=10,
                                    stat="min")
        choices[name] = "gather" if g_ms < GATHER_MARGIN * d_ms else "dense"
        timings[name] = {"gather": round(g_ms, 4), "dense": round(d_ms, 4)}
        log(f"  {name:<40} gather {g_ms:8.3f} ms  dense {d_ms:8.3f} ms  -> {choices[name]}")
    return choices, timings


# --------------------------------------------------------------------------- metadata


def _compression(model: nn.Module, layers) -> str:
    spec = getattr(model, "_xsurgery_spec", None)  # xsurgery.load re-applies the surgery, so loaded models carry it too
    if isinstance(spec, dict):
        if spec.get("compress") is not None:
            return f"{float(spec['compress']):g}"
        if spec.get("degree") is not None:
            return f"degree={spec['degree']}"
    compact = sum(m.weight.numel() for _, m in layers)
    dense = sum(m.weight.numel() // m.degree * m.in_features for _, m in layers)
    return f"{dense / compact:.4g}" if compact else "1"


def _source(model: nn.Module) -> str:
    src = getattr(model, "_xsurgery_source", None)  # xsurgery.load re-applies the surgery, so loaded models carry it too
    if isinstance(src, dict) and src.get("source"):
        kw = src.get("model_kwargs") or {}
        return src["source"] + (f" {json.dumps(kw, sort_keys=True)}" if kw else "")
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _metadata(model, layers, choices, layout, shape, dynamic, opset, inputs=None) -> dict[str, str]:
    rows = []
    for name, m in layers:
        rows.append({"name": name, "type": type(m).__name__, "layout": choices[name], "graph_hash": m.graph.hash(),
                     "graph": m.graph_name, "degree": m.degree, "blocks": m.blocks,
                     "in": m.in_features, "out": m.out_features, "identity_index": bool(m._identity)})
    meta = {
        "version": __version__,
        "source_model": _source(model),
        "compression": _compression(model, layers),
        "layout": layout,
        "layers": json.dumps(rows, separators=(",", ":")),
        "input_shape": json.dumps(["batch" if dynamic else shape[0], *shape[1:]]),
        "opset": str(opset),
    }
    if inputs is not None:
        meta["inputs"] = json.dumps(inputs, separators=(",", ":"))
    spec = getattr(model, "_xsurgery_spec", None)
    if spec is not None:
        meta["surgery"] = json.dumps(spec, sort_keys=True)
    return {_META + k: v for k, v in meta.items()}


def read_metadata(path: str) -> dict[str, Any]:
    """The ``xsurgery.*`` metadata of an exported file (``layers`` decoded from JSON)."""
    import onnx

    props = {p.key[len(_META):]: p.value for p in onnx.load(path, load_external_data=False).metadata_props
             if p.key.startswith(_META)}
    for k in ("layers", "input_shape", "surgery", "inputs"):
        if k in props:
            props[k] = json.loads(props[k])
    return props


# --------------------------------------------------------------------------- export


def _to_cpu(example: tuple) -> tuple:
    def cpu(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu()
        if isinstance(v, (list, tuple)):
            return type(v)(cpu(t) for t in v)
        return v

    args, kwargs = example
    return tuple(cpu(a) for a in args), {k: cpu(v) for k, v in kwargs.items()}


def _feed(names: list[str], tensors: list[torch.Tensor]) -> dict[str, Any]:
    return {n: t.numpy() for n, t in zip(names, tensors)}


def _errors(ref: list[torch.Tensor], got: list) -> tuple[float, float, float]:
    """(max abs error, max |ref|, max abs error / max |ref|) over all outputs."""
    if len(ref) != len(got):
        raise UserError(f"the ONNX model has {len(got)} outputs, torch {len(ref)}")
    abs_err, scale = 0.0, 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        r64 = r.detach().double()
        g64 = torch.from_numpy(g).double()
        # max() would drop a NaN silently (max(0.0, nan) is 0.0): refuse it outright
        for who, t in (("torch", r64), ("ONNX Runtime", g64)):
            if not bool(torch.isfinite(t).all()):
                raise UserError(f"{who}'s output {i} holds NaN/inf on the verification input, so nothing can be "
                                f"verified; check the weights (or pass --no-verify to export unverified)")
        if g64.shape != r64.shape:
            raise UserError(f"ONNX output shape {tuple(g64.shape)} differs from torch's {tuple(r64.shape)}")
        abs_err = max(abs_err, (g64 - r64).abs().max().item() if r64.numel() else 0.0)
        scale = max(scale, r64.abs().max().item() if r64.numel() else 0.0)
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    return abs_err, scale, rel


def _constant(outputs: list[torch.Tensor], first: list[torch.Tensor]) -> bool:
    """True when every output is the same for every input row (of the verification batch
    and of the first example): such a comparison checks nothing about the layers."""
    for o, f in zip(outputs, first):
        if o.dim() == 0 or o.shape[0] == 0 or f.dim() == 0 or f.shape[0] == 0:
            return False
        row = f[:1].detach()
        if o.shape[1:] != row.shape[1:] or not torch.equal(o.detach(), row.expand_as(o)):
            return False
    return True


def _perturbed(model: nn.Module, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy whose all-zero floating parameters (a zero-initialised head, as torchvision's
    ViT) hold small random values, so its outputs depend on the input."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.is_floating_point() and p.numel() and not bool(p.any()):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
                filled.append(name)
    return out, filled


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
        threads: ORT intra-op threads for timing and verification (default: ORT's).
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
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist")

    from ._inputs import describe, flat_tensors, input_names, resample, resolve

    base = copy.deepcopy(model).cpu().eval()
    if not allow_nonfinite:
        from ._manifest import check_finite

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
        log(f"timing gather vs dense per X-layer in ONNX Runtime (batch {shape[0]}):")
        choices, timings = _choose_layouts(layers, shapes, inner, opset, threads, log)
    else:
        choices = {n: ("dense" if layout == "dense" else "gather") for n, _ in layers}

    result = ExportResult(path=path, layout=layout, layers=choices, layer_timings_ms=timings,
                          input_shape=shape, input_names=in_names, dynamic_batch=dynamic, opset=opset)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        export_to(with_layouts(choices), tmp)
        feed = _feed(in_names, flat)
        need_dense = benchmark or (layout == "auto" and "gather" in choices.values())
        dense_sess = None
        if need_dense:
            dense_bytes = io.BytesIO()
            export_to(with_layouts(dict.fromkeys(choices, "dense")), dense_bytes)
            dense_sess = _session(dense_bytes.getvalue(), threads)
        if layout == "auto" and "gather" in choices.values():
            # layers timed alone miss cache effects between them: the whole model decides
            # between the per-layer mix and the two uniform layouts
            candidates = {"per-layer choices": choices, "all-dense": dict.fromkeys(choices, "dense")}
            sessions = [_session(tmp, threads), dense_sess]
            if "dense" in choices.values():
                gather_bytes = io.BytesIO()
                all_gather = dict.fromkeys(choices, "gather")
                export_to(with_layouts(all_gather), gather_bytes)
                candidates["all-gather"] = all_gather
                sessions.append(_session(gather_bytes.getvalue(), threads))
            times = _time_sessions(sessions, feed, budget_s=MODEL_TIMING_S)
            # a gather form must beat all-dense by the margin: closer is noise, and dense is the
            # form with the widest runtime support (MobileNet-V2 gained nothing, docs/bench)
            best = min(range(len(times)), key=lambda i: times[i] / (GATHER_MARGIN if i == 1 else 1.0))
            log("whole model: " + ", ".join(f"{k} {t:.3f} ms" for k, t in zip(candidates, times))
                + f"; keeping {list(candidates)[best]}")
            if best:
                choices = list(candidates.values())[best]
                result.layers = choices
                export_to(with_layouts(choices), tmp)

        proto = onnx.load(tmp)
        inputs = describe(base, example) if not _plain(example) else None
        for k, v in _metadata(model, layers, choices, layout, shape, dynamic, opset, inputs).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, tmp)
        del proto
        onnx.checker.check_model(tmp, full_check=True)
        if layers:
            n_g = sum(v == "gather" for v in choices.values())
            log(f"layout {layout}: {n_g} of {len(choices)} X-layers gather, {len(choices) - n_g} dense")

        sess = _session(tmp, threads)
        if verify:
            from ._inputs import call

            flat_v = flat_tensors(example_v)
            vb = list(flat_v[0].shape)
            flat_ref, got = _flat_outputs(ref), sess.run(None, _feed(in_names, flat_v))
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
                got = _session(vbytes.getvalue(), threads).run(None, _feed(in_names, flat_v))
                result.verified_on = "perturbed copy: " + ", ".join(filled)
            abs_err, scale, rel = _errors(flat_ref, got)
            result.max_abs_err, result.max_rel_err = abs_err, rel
            log(f"verification (input {vb}): max abs err {abs_err:.3g}, max rel err {rel:.3g} "
                f"(relative to max|output| = {scale:.3g})")
            if not abs_err <= atol + rtol * scale:
                raise UserError(f"ONNX Runtime output differs from torch: max abs err {abs_err:.3g} > "
                                f"atol {atol:g} + rtol {rtol:g} * max|output| {scale:.3g}; nothing written")
        if benchmark:
            ms, dense_ms = _time_sessions([sess, dense_sess], feed, budget_s=BENCHMARK_S, min_reps=10, warmup=5)
            result.latency_ms, result.dense_latency_ms = ms, dense_ms
            log(f"ORT latency (batch {shape[0]}, median): exported {ms:.3f} ms, dense original {dense_ms:.3f} ms, "
                f"ratio {ms / dense_ms:.3f}")
        del sess, dense_sess
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"wrote {path}")
    return result


# --------------------------------------------------------------------------- CLI


def _cmd_export(args) -> int:
    from ._args import load_options
    from .checkpoint import resolve_model

    model = resolve_model(args.model, args.model_kwargs, args.pretrained, model=args.dense_model, **load_options(args))
    res = export_onnx(
        model, args.output, input_size=args.input_size, layout=args.layout, opset=args.opset,
        static_batch=args.static_batch, verify=not args.no_verify, rtol=args.rtol, atol=args.atol,
        benchmark=args.benchmark, force=args.force, threads=args.threads, verbose=not args.json,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.json:
        print(json.dumps({**asdict(res), "latency_ratio": res.latency_ratio}, indent=1))
    return 0


def add_cli(subparsers) -> None:
    """Register ``xsurgery export MODEL -o OUT.onnx``."""
    from ._args import add_model_args

    p = subparsers.add_parser("export", help="export to ONNX (Gather + grouped Conv), verified in ONNX Runtime")
    add_model_args(p, checkpoint_ok=True)
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="gather, dense, or auto (default: time both per layer in ORT, keep the faster)")
    p.add_argument("--opset", type=int, default=None, metavar="N", help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--static-batch", type=int, default=None, metavar="N", help="fix the batch size (default dynamic)")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification tolerance relative to max|output| (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute floor of the tolerance (default 1e-6)")
    p.add_argument("--no-verify", action="store_true", help="skip the ORT-vs-torch comparison")
    p.add_argument("--benchmark", action="store_true", help="time ORT latency against the dense original")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="ORT intra-op threads (default ORT's)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--json", action="store_true", help="print the result as JSON (and nothing else)")
    p.set_defaults(func=_cmd_export)
