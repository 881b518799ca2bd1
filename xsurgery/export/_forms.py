"""The export forms of an X-layer (gather, alternatives such as matmul, dense) and a model copy
with chosen forms.

Every X-layer class has one entry in a registry (:func:`register_form`): the builder of its
gather form and whether that form takes the layer's fixed inner input shape; further named
forms of the same class (``register_form(cls, form="matmul")``) are alternatives that
``layout="auto"`` times against the gather and dense forms. The dense form is the layer's own
``to_dense()``. A new X-layer kind is one ``register_form`` entry here.

XLinear has three forms: ``gather`` (Gather + a grouped 1x1 Conv over the tokens),
``matmul`` (Gather + one batched MatMul over the G blocks) and ``dense`` (a plain MatMul on
the zero-filled weight, the fastest where blocks are few or tiny).

The gather form of a conv whose index is a natural and one permuted copy (``graph="paired"``,
or any index of that shape) is written as ``Conv(x) + Conv(Gather(x, perm))``: the same
math as ``Gather(x, index) -> Conv(group=G)`` with half the gathered channels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..layers import X_LAYERS, XConv1d, XConv2d, XConv3d, XLinear, conv_nd

# the gather form of a layer: builder(layer, inner_shape) -> the module to export
# inner_shape of a layer whose row count depends on the input's values (see _inner_shapes)
ANY_ROWS = "any rows"
GatherBuilder = Callable[..., nn.Module]


DENSE = "dense"  # the form every X-layer has: its to_dense()
GATHER = "gather"  # the form every registered class has


@dataclass(frozen=True)
class Form:
    """How one X-layer class is exported: its gather-form builder; ``inner_shape``: the builders
    take the fixed dims of the layer's input between batch and features (see :func:`_inner_shapes`);
    ``others``: further named forms (``auto`` times them against gather and dense)."""

    gather: GatherBuilder
    inner_shape: bool = False
    others: tuple[tuple[str, GatherBuilder], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every form of the class: gather, the alternatives, dense."""
        return (GATHER, *(n for n, _ in self.others), DENSE)

    def builder(self, name: str) -> GatherBuilder:
        if name == GATHER:
            return self.gather
        for n, b in self.others:
            if n == name:
                return b
        raise ValueError(f"no export form {name!r}; this class has {', '.join(self.names)}")


_FORMS: dict[type, Form] = {}


def register_form(*classes: type, inner_shape: bool = False,
                  form: str = GATHER) -> Callable[[GatherBuilder], GatherBuilder]:
    """Decorator: ``builder`` makes the ``form`` of ``classes``: ``gather`` (a class registered
    twice raises), or the name of an alternative form of a class whose gather form is registered."""
    def add(builder: GatherBuilder) -> GatherBuilder:
        for cls in classes:
            have = _FORMS.get(cls)
            if form == GATHER and have is not None:
                raise ValueError(f"{cls.__name__} already has an export form")
            if form != GATHER and have is None:
                raise ValueError(f"{cls.__name__} needs a gather form before a {form!r} form")
            if form != GATHER and form in have.names:
                raise ValueError(f"{cls.__name__} already has a {form!r} form")
        for cls in classes:
            if form == GATHER:
                _FORMS[cls] = Form(builder, inner_shape)
            else:
                have = _FORMS[cls]
                _FORMS[cls] = Form(have.gather, have.inner_shape, (*have.others, (form, builder)))
        return builder

    return add


def forms_of(layer: nn.Module) -> tuple[str, ...]:
    """The export forms of an X-layer: ``gather``, its alternatives, ``dense``."""
    return form_for(type(layer)).names


def form_for(cls: type) -> Form:
    """The registered form of an X-layer class (or of its nearest registered base class)."""
    for base in cls.__mro__:
        if base in _FORMS:
            return _FORMS[base]
    raise UserError(f"{cls.__name__} has no ONNX export form; known: {', '.join(c.__name__ for c in _FORMS)}")


@register_form(XLinear, inner_shape=True)
class _GatherLinear(nn.Module):
    """Export form of an XLinear: Gather on the feature axis + a grouped 1x1 Conv (a grouped matmul).

    The rows are laid out ``[1, C_in, M]`` (M = all leading positions) so that the Gather
    copies contiguous rows and the grouped Conv runs G GEMMs of ``[O/G, D] x [D, M]``; ORT's
    Gather on the innermost axis copies element by element and was up to 30x slower.

    ORT's Conv refuses M = 0, so a layer whose row count depends on the input's values
    (``inner_shape`` is :data:`ANY_ROWS`: a detection head, whose proposals may be none) runs
    the same G GEMMs as one batched MatMul ``[G, O/G, D] x [G, D, M]``, which takes any M
    (up to 1.6x slower than the Conv at some shapes, so only where the rows vary).
    """

    matmul = False  # the batched MatMul for every row count (_MatMulLinear)

    def __init__(self, layer: XLinear, inner_shape: tuple[int, ...] | str | None = None) -> None:
        super().__init__()
        self.blocks, self.in_features, self.out_features = layer.blocks, layer.in_features, layer.out_features
        # the dims between batch and features when they are fixed: the output reshape then has
        # a constant shape instead of a Shape/Gather/Concat chain per layer
        self.any_rows = self.matmul or inner_shape == ANY_ROWS
        inner_shape = None if inner_shape == ANY_ROWS else inner_shape
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
        if self.any_rows or rows.shape[-1] == 0:  # rows that may be none: Conv refuses a 0-length
            # input, and reshape(-1, ...) of nothing is ambiguous: the same math as a batched matmul
            g, d = self.blocks, self.weight.shape[1]
            y = torch.matmul(self.weight.view(g, self.out_features // g, d), rows.view(g, d, -1))
            y = y.reshape(self.out_features, -1)  # [O, M]
            if self.bias is not None:
                y = y + self.bias.view(-1, 1)
            return y.t().reshape(*lead, self.out_features)
        y = F.conv1d(rows, self.weight, self.bias, groups=self.blocks)  # [1, C_out, M]
        return y.squeeze(0).t().reshape(*lead, self.out_features)


@register_form(XLinear, inner_shape=True, form="matmul")
class _MatMulLinear(_GatherLinear):
    """Alternative export form of an XLinear: the same Gather on ``[C_in, M]`` rows, then one
    batched ``MatMul`` ``[G, O/G, D] x [G, D, M]`` over the blocks instead of the grouped Conv
    (ORT and OpenVINO run the two through different kernels; ``auto`` keeps the faster)."""

    matmul = True


def paired_perm(layer: nn.Module) -> torch.Tensor | None:
    """The permutation ``perm`` when the index rows are ``[own chunk g, perm chunk g]``, else None.

    Own chunk g is the contiguous inputs ``g*D/2 .. (g+1)*D/2 - 1``; the permuted halves
    together read every input once.
    """
    if isinstance(layer, XLinear) or layer.degree % 2 or layer.blocks < 2:
        return None
    half = layer.degree // 2
    if layer.blocks * half != layer.in_features:
        return None
    rows = layer.index.detach().cpu().view(layer.blocks, layer.degree)
    if not torch.equal(rows[:, :half].reshape(-1), torch.arange(layer.in_features)):
        return None
    perm = rows[:, half:].reshape(-1)
    if not torch.equal(perm.sort().values, torch.arange(layer.in_features)):
        return None
    return perm.clone()


class _PairedConv(nn.Module):
    """Export form of a paired X-conv: ``conv(x, W_own, G) + conv(x[:, perm], W_perm, G)``."""

    def __init__(self, layer: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        half = layer.degree // 2
        self.blocks, self.dims, self.padding_mode = layer.blocks, layer._dims, layer.padding_mode
        self.stride, self.padding, self.dilation = layer.stride, layer._padding_args(), layer.dilation
        w = layer.weight.detach()
        self.register_buffer("w_own", w[:, :half].clone())
        self.register_buffer("w_perm", w[:, half:].clone())
        self.register_buffer("perm", perm)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.stride, self.padding, self.dilation, self.blocks, self.padding_mode, self.dims)
        own = conv_nd(x, self.w_own, self.bias, *args)
        return own + conv_nd(x.index_select(1, self.perm), self.w_perm, None, *args)


@register_form(XConv1d, XConv2d, XConv3d)
def _gather_conv(layer: nn.Module, _inner_shape: tuple[int, ...] | None = None) -> nn.Module:
    """``Gather -> Conv(group=G)`` (the layer with ``execution="gather"``), or the paired form."""
    perm = paired_perm(layer)
    if perm is not None:
        return _PairedConv(layer, perm)
    layer = copy.copy(layer)  # shares parameters; only the execution attribute differs
    layer.execution = "gather"
    return layer


def _x_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, X_LAYERS)]


def _layer_form(layer: nn.Module, layout: str, inner_shape: tuple[int, ...] | str | None = None) -> nn.Module:
    if layout == DENSE:
        return layer.to_dense()
    return form_for(type(layer)).builder(layout)(layer, inner_shape)


def _with_layouts(model: nn.Module, choices: dict[str, str], inner: dict[str, tuple[int, ...] | None]) -> nn.Module:
    out = copy.deepcopy(model)
    for name, layout in choices.items():
        if not name:  # the model is itself an X-layer
            return _layer_form(out, layout, inner.get(name))
        out.set_submodule(name, _layer_form(out.get_submodule(name), layout, inner.get(name)))
    return out


def _run_recording(model: nn.Module, example: tuple, names: list[str],
                   varied: bool = False) -> tuple[Any, dict[str, list[tuple]]]:
    """``model(*args, **kwargs)`` and the distinct input shapes each named layer saw; ``varied``:
    the example is the dynamic export's verification input (another batch and sequence)."""
    from ..models import call, first_error_line, shapes_text

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
        if varied:
            raise UserError(f"the model does not run on the example at twice its batch and half its sequence "
                            f"({shapes_text(example)}: {first_error_line(exc)}), which a file with dynamic axes "
                            f"must; export at the example's shapes: --static-batch N (static_batch= in Python)") from exc
        raise UserError(f"the model does not run on the example input ({shapes_text(example)}): "
                        f"{first_error_line(exc)}; give an input it takes (--input / --input-size)") from exc
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _rows(shapes: list[tuple]) -> list[int]:
    return [math.prod(s[:-1]) for s in shapes]


def _inner_shapes(layers, shapes: dict, other: dict | None, same: dict | None = None) -> dict[str, tuple | str | None]:
    """Per layer whose form takes it (XLinear) the fixed dims of its input between batch and
    features, if they are fixed; :data:`ANY_ROWS` where its row count depends on the values.

    ``other`` holds the shapes seen at twice the batch (dynamic export): only dims that do
    not change with the batch may become constants; ``None`` (static batch) trusts them all.
    ``same`` holds the shapes seen on other values of the example's shape: a layer that saw
    another row count there, or 0 rows anywhere, has rows that depend on the values (a
    detection head's proposals).
    """
    inner: dict[str, tuple | str | None] = {}
    for n, m in layers:
        if not form_for(type(m)).inner_shape:
            continue
        s = shapes[n]
        r, r_same, r_other = _rows(s), _rows((same or {}).get(n, s)), _rows((other or {}).get(n, s))
        if 0 in r + r_same + r_other or r_same != r:
            inner[n] = ANY_ROWS
            continue
        ok = len(s) == 1 and len(s[0]) >= 2
        if ok and other is not None:
            o = other[n]
            ok = len(o) == 1 and len(o[0]) == len(s[0]) and o[0][0] == 2 * s[0][0] and o[0][1:] == s[0][1:]
        inner[n] = tuple(s[0][1:-1]) if ok else None
    return inner


def takes_inner_shape(layers) -> bool:
    """Whether any of ``layers`` (name, module) has a form that takes its inner input shape."""
    return any(form_for(type(m)).inner_shape for _, m in layers)
