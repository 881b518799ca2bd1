"""torch -> ONNX with the TorchScript exporter, and one-line errors naming the op and layer."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError


class _FlatInputs(nn.Module):
    """Calls ``model`` with the example's structure from a flat list of tensors (the ONNX inputs).

    Positional inputs come first, then keyword inputs in the example's order; a tensor nested
    in a list, tuple or dict (torchvision detection's list of images, a ``batch`` dict) is one
    entry per tensor, in the order :func:`xsurgery.models.flat_tensors` gives them, and values
    that are not tensors stay the example's.
    """

    def __init__(self, model: nn.Module, example: tuple, flatten_out: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flatten_out = flatten_out  # an output the exporter cannot take (a dataclass): its tensors
        self.skeleton = _skeleton(example)

    def forward(self, *flat: torch.Tensor) -> Any:
        args, kwargs = _refill(self.skeleton, iter(flat))
        out = self.model(*args, **kwargs)
        return tuple(_flat_outputs(out)) if self.flatten_out else out


class _Slot:
    """Where one ONNX input goes in the example's structure."""


def _skeleton(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _Slot()
    if isinstance(obj, Mapping):
        return {k: _skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(_skeleton(v) for v in obj)
    return obj


def _refill(obj: Any, flat: Any) -> Any:
    if isinstance(obj, _Slot):
        return next(flat)
    if isinstance(obj, dict):
        return {k: _refill(v, flat) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(_refill(v, flat) for v in obj)
    return obj


def prepare_for_export(base: nn.Module) -> str | None:
    """Refuse weight dtypes the runtime cannot run (one line naming the fix), and turn a generative
    model's cache off (a ``DynamicCache`` is no ONNX output); returns what the export states about
    the cache (``xsurgery.cache`` metadata), ``None`` for a model without one."""
    bad = sorted({str(p.dtype).replace("torch.", "") for p in base.parameters()
                  if p.dtype in (torch.bfloat16, torch.float64)})
    if bad:
        raise UserError(f"export writes float32 models and this one's weights are {', '.join(bad)} (ONNX Runtime has "
                        f"no {'/'.join(bad)} kernels for the ops its layers export to); export model.float() with "
                        f"float32 inputs")
    config = getattr(base, "config", None)
    if getattr(config, "use_cache", False) is not True:
        return None
    config.use_cache = False  # on the export's own copy
    return "off: exported with use_cache=False (outputs are the logits and other tensors, no past_key_values)"


def explain_failure(exc: UserError, choice: dict[str, str], export_dense: Callable[[dict[str, str]], Any]) -> UserError:
    """The export of ``choice`` failed with ``exc``: the same error, saying whether the torch exporter
    fails on the model with every layer dense too (its own limit, not the surgery's)."""
    dense = dict.fromkeys(choice, "dense")
    if choice != dense:
        try:
            export_dense(dense)
        except UserError:
            pass
        else:
            return exc
    return UserError(f"{exc}; the torch exporter fails on this model with every layer dense too (its own limit, "
                     f"not the surgery's)")


def needs_flat_outputs(out: Any) -> bool:
    """The output holds something the TorchScript exporter refuses (a plain dataclass)."""
    if isinstance(out, torch.Tensor):
        return False
    if isinstance(out, dict):
        return any(needs_flat_outputs(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return any(needs_flat_outputs(v) for v in out)
    return dataclasses.is_dataclass(out) and not isinstance(out, type)


def _plain(example: tuple) -> bool:
    args, kwargs = example
    return len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)


def _dynamic_axes(example: tuple, names: list[str], flat: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch on axis 0 of every input of the first one's batch; sequence on axis 1 of integer
    (token) inputs.

    Token inputs of one length share one sequence axis (``input_ids`` and its
    ``attention_mask``); ``decoder_*`` inputs have their own (``decoder_sequence``, as
    Hugging Face's exporters name it), and so does any other input of another length:
    ORT refuses one axis name bound to two sizes (T5's encoder and decoder ids).
    """
    listed = isinstance(example[0][0], list) if example[0] else False
    axes: dict[str, dict[int, str]] = {}
    lengths: dict[str, int] = {}
    batch = next((t.shape[0] for t in flat if t.dim()), None)
    for name, t in zip(names, flat):
        if listed and name.count(".") or t.dim() == 0:  # images of a list: [C, H, W], no batch axis
            continue
        # axis 0 is the batch where it has the first input's size (a graph's [2, E] edges: not)
        axes[name] = {0: "batch"} if t.shape[0] == batch else {}
        if t.dim() >= 2 and not t.dtype.is_floating_point and t.dtype != torch.bool:
            axis = "decoder_sequence" if name.startswith("decoder_") else "sequence"
            if lengths.setdefault(axis, t.shape[1]) != t.shape[1]:
                axis = f"{name}_sequence"
            axes[name][1] = axis
    return {k: v for k, v in axes.items() if v}


def _flat_outputs(obj: Any) -> list[torch.Tensor]:
    """The output's tensors in order (tensors, dicts, lists/tuples, and plain dataclasses' fields)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
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
                     f"(replace that layer or try another --opset){_mask_hint(module)}")


def _mask_hint(module: nn.Module) -> str:
    """A Hugging Face model given its token ids without an attention mask: GPT-2 and others then
    build the mask in their forward from ops with no ONNX form; given a mask, they export."""
    if not isinstance(module, _FlatInputs) or getattr(module.model, "config", None) is None:
        return ""
    try:
        takes = "attention_mask" in inspect.signature(module.model.forward).parameters
    except (TypeError, ValueError):
        return ""
    skel = module.skeleton
    given = set(skel[1]) if isinstance(skel, tuple) and len(skel) == 2 and isinstance(skel[1], dict) else set()
    if not takes or "attention_mask" in given or "input_ids" not in given:
        return ""
    return "; a Hugging Face model exports with its attention mask: add --input attention_mask=<input_ids' shape>:int64"


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
        buf = io.BytesIO()
        try:
            torch.onnx.export(
                module, example, buf, input_names=input_names, output_names=names, dynamic_axes=axes,
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        except Exception as exc:
            if isinstance(exc, UserError):
                raise
            raise _export_error(exc, opset, module, example) from exc
    data = _fold(buf.getvalue())
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(data)
    else:
        f.write(data)


def _fold(data: bytes) -> bytes:
    """The exported bytes with paired convs' ``Add -> BatchNormalization`` folded (``_fold``)."""
    if b"BatchNormalization" not in data:
        return data
    import onnx

    from ._fold import fold_add_batchnorm

    proto = onnx.load_from_string(data)
    return proto.SerializeToString() if fold_add_batchnorm(proto) else data


def _to_bytes(module: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    _torch_export(module, example, buf, opset, dynamic=False, n_out=1)
    return buf.getvalue()
