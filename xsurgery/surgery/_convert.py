"""Surgery: replace chosen conv/linear layers of any model with X-layers.

The model is traced with torch.fx (timm's no-trace leaf modules and functions registered)
to find, by data flow, the stem (convs reading the input before any other learned op) and
the classifier (layers whose output reaches the model output with no learned op after
them). The chosen modules are then swapped by qualified name in a deep copy, so the result
keeps its class and methods (timm's ``forward_features``, ``pretrained_cfg``, ...). When
tracing fails the same rules run on module order instead, and the surgery says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .._util.copying import deepcopy_model
from ..errors import UserError
from ..graphs import build_graph, choose_blocks, degree_for, layer_seed, min_covering_degree
from ..layers import X_LAYERS, SparsityConfig, kind_family, layer_kind
from ._budget import budget_targets, fit_budget, record_reached
from ._fx import Trace, fallback_roles, trace_roles
from ._mixpoints import place_mix_points
from ._outcheck import check_outputs
from ._probe import probe_layers
from ._reasons import direct_weight_users, other_reason, shared_tensors, weight_hooks, weight_params
from ._spec import KINDS, Decision, LayerRule, SurgerySpec, load_plan, match_pattern, rule_for

__all__ = ["KINDS", "Decision", "LayerRule", "SurgerySpec", "apply_surgery", "check_outputs", "convert", "decide",
           "load_plan"]

# ---------------------------------------------------------------------------- decisions

# nn.ConvNd / nn.Linear subclasses with the same forward (safe to replace)
_SAME_FORWARD = {"torch.nn.modules.linear.NonDynamicallyQuantizableLinear", "timm.layers.linear.Linear"}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_forward(m: nn.Module) -> bool:
    """The module computes what its torch base class does (safe to replace by an X-layer).

    A subclass that only changes ``__init__`` (torchvision's ``Conv3DSimple``) qualifies; one
    that overrides ``forward`` / ``_conv_forward`` (timm's ``StdConv2d``) does not, unless
    known to compute the same.
    """
    cls, base = type(m), layer_kind(m).base
    if base is None or cls is base or _qualname(cls) in _SAME_FORWARD:
        return True
    return cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)


def is_layer_candidate(m: nn.Module) -> bool:
    """A conv/linear module of a kind the surgery knows (convertible or with a reason why not)."""
    return layer_kind(m) is not None


def _match_any(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if match_pattern(name, p)), None)


def decide(model: nn.Module, spec: SurgerySpec, example: Any = None, *,
           only: Iterable[str] | None = None) -> tuple[list[Decision], Trace]:
    """Decide, for every weight-carrying module, whether and how to convert it (no model change).

    Conv1d/2d/3d, Linear and transformers' ``Conv1D`` are candidates; every other module
    with a weight matrix or kernel (ConvTranspose, RNNs, Embedding, MultiheadAttention, ...)
    gets a decision ``converted=False`` with its reason. A layer whose weight or bias tensor
    is shared with another module (tied embeddings) is never converted.

    With an ``example`` (``(args, kwargs)``) the model also runs once under a probe
    (:func:`probe_layers`): layers whose weight an op reads outside their forward stay dense,
    layers fed the raw floating input are stems, and a subclass whose forward computes its base
    class's on the example is replaceable. ``only``: convert exactly these layers (a checkpoint's
    recorded ones), whatever else decides.
    """
    trace = trace_roles(model)
    if not trace.ok:
        roles = fallback_roles(model)
        trace.stems, trace.classifiers = roles.stems, roles.classifiers
    custom = {n for n, m in model.named_modules() if is_layer_candidate(m) and not _same_forward(m)}
    probe = probe_layers(model, example, custom)
    trace.stems |= probe.raw_input
    only = None if only is None else set(only)
    names = [n for n, m in model.named_modules() if is_layer_candidate(m)]
    for pats, flag in ((spec.include, "--include"), (spec.exclude, "--exclude")):
        for p in pats:
            if not any(_match_any(n, [p]) for n in names):
                raise UserError(f"{flag} pattern {p!r} matches no conv/linear layer; see `xsurgery plan MODEL` for names")
    for rule in spec.plan:
        if not any(rule.matches(n) for n in names):
            raise UserError(f"plan pattern {rule.pattern!r} matches no conv/linear layer; see `xsurgery plan MODEL` for names")
    direct = direct_weight_users(model)
    shared = shared_tensors(model)
    decisions = []
    for name, m in model.named_modules():
        if not is_layer_candidate(m):
            weights = weight_params(m)
            experts = [(n, p) for n, p in m._parameters.items()  # [E, out, in], E > 1 (not a [1, N, C] token)
                       if p is not None and p.dim() == 3 and p.shape[0] > 1]
            if experts and not weights:  # MoE experts: [E, out, in] stacks run by an expert-indexed matmul
                w = experts[0][1]
                stacks = ", ".join(f"{n} {list(p.shape)}" for n, p in experts)
                decisions.append(Decision(
                    name, "experts", False, f"MoE experts ({stacks}) run as an expert-indexed matmul; "
                    f"no X-layer form (kept dense)", int(w.shape[-1]), int(w.shape[-2]), None))
            elif weights:
                kind, reason = other_reason(m)
                w = weights[0][1]
                decisions.append(Decision(name, kind, False, reason, int(w.shape[1]), int(w.shape[0]),
                                          list(w.shape[2:]) or None))
            continue
        kind = kind_family(m)
        cin, cout, kernel = layer_kind(m).shape(m)
        d = Decision(name, kind, False, None, cin, cout, kernel)
        decisions.append(d)
        rule = rule_for(name, spec.plan)
        tied = [f"{p} with {', '.join(shared[f'{name}.{p}'])}" for p in ("weight", "bias") if f"{name}.{p}" in shared]
        if only is not None:
            if name in only:
                _plan_layer(d, spec, rule)
            else:
                d.reason = "kept dense in the checkpoint"
            continue
        hooked = weight_hooks(m)
        if tied:
            d.reason = f"{'; '.join(tied)} shared (tied weights are never converted)"
        elif hooked:
            d.reason = hooked
        elif name in direct:
            d.reason = "weights read directly by nn.MultiheadAttention"
        elif name in probe.direct:
            d.reason = f"weights read directly ({probe.direct[name]} of {name}.weight outside its forward); kept dense"
        elif name in custom and name not in probe.same_forward:
            base = layer_kind(m).base
            why = "differs from" if name in probe.differs else "is not known to compute"
            d.reason = f"custom {type(m).__name__} (its forward {why} nn.{base.__name__ if base else 'Linear'}'s)"
        elif kind in ("depthwise", "grouped"):
            d.reason = f"{kind} conv (groups={m.groups}) is never converted"
        elif name in trace.direct:
            d.reason = "weights read directly (e.g. F.linear(x, layer.weight)), not called as a module"
        elif _match_any(name, spec.exclude):
            d.reason = f"excluded by --exclude {_match_any(name, spec.exclude)}"
        elif rule is not None and rule.skip:
            d.reason = f"kept dense by plan rule {rule.pattern!r}"
        elif not (_match_any(name, spec.include) or rule is not None):
            if kind not in spec.layers:
                d.reason = f"{kind} not in --layers"
            elif name in trace.stems and not spec.include_stem:
                d.reason = "stem (--include-stem)"
            elif name in trace.classifiers and not spec.include_classifier:
                d.reason = "classifier (--include-classifier)"
            elif cin < spec.min_channels:
                d.reason = f"narrower than --min-channels {spec.min_channels}"
        if d.reason is None:
            _plan_layer(d, spec, rule)
    place_mix_points(decisions, trace, spec.mix_points)
    for rule in spec.plan:  # a rule's degree is checked like --degree: it must fit some layer it decides
        if rule.degree is None:
            continue
        mine = [d for d in decisions if d.reason is None or d.reason.startswith("degree")
                if rule_for(d.name, spec.plan) is rule and d.kind in ("pointwise", "conv", "linear")]
        if mine and not any(d.converted for d in mine):
            widest = max(d.in_channels for d in mine)
            raise UserError(f"plan rule {rule.pattern!r}: degree {rule.degree} is larger than the input channels of "
                            f"every layer it matches (at most {widest}); use a smaller degree or compress")
    if spec.degree is not None and not any(d.converted for d in decisions) \
            and any(d.reason and d.reason.startswith("degree") for d in decisions):
        raise UserError(f"--degree {spec.degree} is larger than the input channels of every selected layer; "
                        f"use a smaller degree or --compress")
    return decisions, trace


def _plan_layer(d: Decision, spec: SurgerySpec, rule: LayerRule | None) -> None:
    compress, degree, mixing, construction = spec.compress, spec.degree, spec.mixing, spec.graph
    if rule is not None:
        if rule.compress is not None or rule.degree is not None:
            compress, degree = rule.compress, rule.degree
        mixing = rule.mixing if rule.mixing is not None else mixing
        construction = rule.graph or construction
    if degree is not None and degree > d.in_channels:
        d.reason = f"degree {degree} > {d.in_channels} input channels"
        return
    try:
        D = degree_for(d.in_channels, compress=compress, degree=degree)
        if degree is None:  # a compression never leaves inputs unread: raise D to what covers them
            D = max(D, min_covering_degree(d.in_channels, d.out_channels, construction))
        seed = layer_seed(spec.seed, d.name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            blocks = choose_blocks(d.in_channels, d.out_channels, D, mixing, construction)
            g = build_graph(d.in_channels, d.out_channels, D, blocks, construction=construction, seed=seed)
    except ValueError as exc:
        d.reason = str(exc).split(";")[0]
        return
    if caught:
        d.note = "; ".join(str(w.message) for w in caught)
    d.converted, d.degree, d.blocks, d.graph = True, g.degree, g.blocks, g.construction
    d.mixing, d.seed, d._graph = g.mixing, g.seed, g


# ------------------------------------------------------------------------------- apply


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, child_name, new)


def apply_surgery(model: nn.Module, spec: SurgerySpec, example: Any = None, *,
                  only: Iterable[str] | None = None) -> tuple[nn.Module, list[Decision], Trace]:
    """Convert a deep copy of ``model``; returns (copy, decisions, trace info). ``example`` and
    ``only``: see :func:`decide`."""
    decisions, trace = decide(model, spec, example, only=only)
    out = deepcopy_model(model)
    modules = dict(out.named_modules())
    for d in decisions:
        if not d.converted:
            continue
        dense = modules[d.name]
        layer = layer_kind(dense).x_class.from_dense(dense, graph=d._graph, init=spec.init, execution=spec.execution)
        layer.train(dense.training)
        _swap(out, dense, layer)
    _disable_fused_encoder(out)
    out._xsurgery_spec = spec.to_dict()
    return out, decisions, trace


def _disable_fused_encoder(model: nn.Module) -> None:
    """Send converted ``nn.TransformerEncoderLayer``s down their regular (module-calling) path.

    In eval, torch's fused fast path (``torch._transformer_encoder_layer_fwd``) reads
    ``linear1.weight`` / ``linear2.weight`` / ``self_attn.out_proj.weight`` as dense matrices
    instead of calling the modules, which an X-layer's compact weight is not. The layer takes
    the fast path only when ``activation_relu_or_gelu`` is set (torch stashes the activation
    there for that check alone), and the encoder builds nested tensors only when
    ``use_nested_tensor``; clearing both gives the same math through the modules.
    """
    xs = X_LAYERS
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(isinstance(c, xs) for c in m.modules()):
            m.activation_relu_or_gelu = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(c, xs) for c in m.modules()):
            m.use_nested_tensor = False


def normalize_input_size(input_size: int | Sequence[int] | None, model: nn.Module) -> tuple[int, ...]:
    """``None`` -> the model's default image size; else the per-sample shape ``input_size`` means
    for this model (see :func:`xsurgery.models.inputs.shape_from_size`: image shorthand, or the
    feature / sequence / clip shape when the first layer is a Linear, Embedding, Conv1d, Conv3d)."""
    from ..models import known_image_size, shape_from_size

    if input_size is None:
        return known_image_size(model)
    return shape_from_size(model, input_size)[0]


def convert(
    model: nn.Module | str,
    config: SparsityConfig | None = None,
    *,
    init: str = "kaiming",
    layers: Sequence[str] = KINDS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    include_stem: bool = False,
    include_classifier: bool = False,
    min_channels: int = 0,
    plan: str | Sequence | dict | None = None,
    input_size: int | Sequence[int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    check: bool = True,
    allow_none: bool = False,
    example_inputs: Any = None,
    target_macs: int | str | None = None,
    target_params: int | str | None = None,
    match_macs: nn.Module | str | None = None,
    **sparsity: Any,
):
    """Replace chosen conv/linear layers with X-layers; returns ``(converted, report)``.

    Args:
        model: an ``nn.Module`` (not modified) or a model source (see
            :func:`xsurgery.models.sources.create_model`).
        config: a :class:`~xsurgery.layers.SparsityConfig`: compress (default 2) or degree,
            mixing, graph, seed, execution, mix points. ``mix_points="chain"``: the widest layer of
            each chain of converted layers (and a layer parallel to a chain) is grouped, the
            chain's other layers mix; ``every``: the graph at every layer; ``auto`` (default):
            ``chain`` for mixing-1 layers, ``every`` for the others.
        **sparsity: any of the config's fields as keywords (``compress=4, mixing=1``), overriding
            ``config``; the config's ``blocks`` is per layer and not taken here.
        init: ``kaiming`` (fresh) or ``keep`` (copy the kept dense weights).
        layers: kinds to convert: ``pointwise``, ``conv``, ``linear``.
        include: glob/``re:`` patterns converted regardless of the defaults.
        exclude: patterns never converted (wins over ``include``).
        include_stem: convert the stem conv(s) too.
        include_classifier: convert the classifier too.
        min_channels: skip layers with fewer input channels.
        plan: per-pattern rules (file path, list or dict; see :func:`load_plan`).
        input_size: shorthand for a float example of this per-sample shape: ``H``, ``(H, W)``
            or ``(C, H, W)`` for image models; the feature shape when the first layer is an
            ``nn.Linear`` (``40`` -> ``[1, 40]``), a length for Conv1d / embedding models.
        model_kwargs: factory kwargs when ``model`` is a name.
        pretrained: ask for the library's weights when ``model`` is a name.
        check: run original and converted on the example and compare the outputs' structure
            (see :func:`check_outputs`); ``False`` skips it.
        example_inputs: what the model runs on for the check and the report: a tensor, a
            tuple of positional inputs or a dict of keyword inputs (real dtypes and devices),
            or ``--input`` spec strings. Default: the model family's own example
            (:func:`xsurgery.models.inputs.default_example`); a model of no known family is
            converted by structure alone and its report has no MACs.
        allow_none: accept a surgery that converts no layer (otherwise a :class:`UserError`).
        target_macs, target_params: a budget (``1.2G``, ``300M``, ``4.5k`` or an integer) for the
            converted model's total MACs (on the example) or parameters: the uniform compression
            of the selected layers that meets it within 2% (instead of compress/degree; see
            :mod:`xsurgery.surgery._budget`). The report's ``budget`` says target and reached.
        match_macs: a budget of another model's total MACs (a module or a source, run on the
            same example_inputs / input_size).

    Returns:
        The converted model (same class as the input) and its :class:`~xsurgery.analysis.Report`.
    """
    from ..analysis import report as make_report
    from ..models import call, create_model, describe, per_sample_size
    from ..models import resolve as resolve_example

    if isinstance(model, str):
        if model.endswith((".xs", ".safetensors")):
            raise UserError("convert takes a model, not a checkpoint; use `xsurgery report` or `xsurgery export` on checkpoints")
        name = model
        model = create_model(model, model_kwargs, pretrained)
    elif isinstance(model, nn.Module):
        if model_kwargs or pretrained:
            raise UserError("model_kwargs/pretrained only apply when the model is given by name")
        name = type(model).__name__
    else:
        raise UserError(f"convert takes an nn.Module or a model name, got {type(model).__name__}")
    cfg = SparsityConfig.of(config, **sparsity)
    budget = budget_targets(cfg, target_macs, target_params, match_macs)
    spec = SurgerySpec.from_config(
        cfg, init=init,
        layers=(layers,) if isinstance(layers, str) else tuple(layers),
        include=(include,) if isinstance(include, str) else tuple(include),
        exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude),
        include_stem=include_stem, include_classifier=include_classifier, min_channels=min_channels,
        plan=load_plan(plan),
    )
    lazy = [n for n, m in model.named_modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and m.has_uninitialized_params()]
    if lazy:  # shapes come from the first call: make it on a copy, as the user's first call would
        if example_inputs is None:
            raise UserError(f"the model has uninitialized lazy modules ({', '.join(lazy[:3])}); pass example_inputs= "
                            f"(--input SHAPE) so they initialize on it, or run the model once before converting")
        model = deepcopy_model(model)
        with torch.no_grad():
            call(model, resolve_example(model, example_inputs, None))
    example = resolve_example(model, example_inputs, input_size)
    if budget is not None:
        spec, budget = fit_budget(model, spec, decide(model, spec, example)[0], example, budget,
                                  example_inputs=example_inputs, input_size=input_size)
    converted, decisions, trace = apply_surgery(model, spec, example)
    if not allow_none and not any(d.converted for d in decisions):
        raise UserError(_none_converted(decisions))
    if example is not None:
        converted._xsurgery_inputs = describe(model, example)
        if len(example[0]) == 1 and not example[1] and isinstance(example[0][0], torch.Tensor):
            converted._xsurgery_input_size = per_sample_size(example)
        if check:
            check_outputs(model, converted, example)
    rep = make_report(converted, example_inputs=example, name=name, decisions=[d.to_dict() for d in decisions])
    rep.method = "fx" if trace.ok else "module-swap"
    rep.trace_error = trace.error
    rep.budget = None if budget is None else record_reached(budget, rep.totals)
    return converted, rep


def _none_converted(decisions: Sequence[Decision]) -> str:
    from collections import Counter

    if not decisions:
        return "the model has no conv/linear layer to convert; pass --allow-none (allow_none=True) to accept it unchanged"
    reasons = Counter((d.reason or "").split(" (")[0] for d in decisions)
    top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
    return (f"0 of {len(decisions)} layers converted ({top}); use --include/--plan to choose layers, "
            f"or pass --allow-none (allow_none=True) to accept it unchanged")
