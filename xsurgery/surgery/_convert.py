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

from .._util.copying import deepcopy_model, uncompiled
from ..errors import UserError
from ..graphs import build_graph, choose_blocks, degree_for, layer_seed, min_covering_degree
from ..layers import X_LAYERS, SparsityConfig, kind_family, layer_kind
from ._budget import budget_targets, fit_budget, record_reached
from ._fx import Trace
from ._mixpoints import place_mix_points
from ._outcheck import check_outputs
from ._project import DEFAULT_RIDGE, calibration_batches, layer_rows, project, ridge_solve
from ._reasons import LayerContext, is_layer_candidate, other_decisions
from ._spec import (
    KINDS,
    Decision,
    LayerRule,
    SurgerySpec,
    check_degrees_fit,
    check_patterns_match,
    load_plan,
    rule_for,
)

__all__ = ["KINDS", "Decision", "LayerRule", "SurgerySpec", "apply_surgery", "check_outputs", "convert", "decide",
           "layer_rows", "load_plan", "project", "ridge_solve"]

# ---------------------------------------------------------------------------- decisions

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

    Phases: roles (fx trace or module order, and the probe) -> patterns match some layer ->
    one decision per module -> mix points -> degrees fit.
    """
    ctx = LayerContext(model, example)
    check_patterns_match(spec, [n for n, m in model.named_modules() if is_layer_candidate(m)])
    only = None if only is None else set(only)
    decisions = []
    for name, m in model.named_modules():
        if not is_layer_candidate(m):
            decisions += other_decisions(name, m)
            continue
        cin, cout, kernel = layer_kind(m).shape(m)
        d = Decision(name, kind_family(m), False, None, cin, cout, kernel)
        decisions.append(d)
        rule = rule_for(name, spec.plan)
        if only is not None:
            d.reason = None if name in only else "kept dense in the checkpoint"
        else:
            d.reason = ctx.reason(name, m, d, spec, rule)
        if d.reason is None:
            _plan_layer(d, spec, rule)
    place_mix_points(decisions, ctx.trace, spec.mix_points, spec.version)
    check_degrees_fit(decisions, spec)
    return decisions, ctx.trace


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
        init = "keep" if spec.init == "project" else spec.init  # project refits the kept weights (convert)
        layer = layer_kind(dense).x_class.from_dense(dense, graph=d._graph, init=init, execution=spec.execution)
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
    weights: str | None = None,
    calibration: Any = None,
    ridge: float = DEFAULT_RIDGE,
    **sparsity: Any,
):
    """Replace chosen conv/linear layers with X-layers; returns ``(converted, report)``.

    Args:
        model: an ``nn.Module`` (not modified) or a model source (see
            :func:`xsurgery.models.sources.create_model`).
        config: a :class:`~xsurgery.layers.SparsityConfig`: compress (default 2) or degree,
            mixing (default 1), graph (default auto), seed, execution, mix points. ``mix_points="chain"``: the widest layer of
            each chain of converted layers (and a layer parallel to a chain) is grouped, the
            chain's other layers mix; ``alternate``: every other layer of a chain mixes, the widest grouped;
            ``every``: the graph at every layer; ``auto`` (default): ``alternate`` for mixing-1
            layers, ``every`` for the others.
        **sparsity: any of the config's fields as keywords (``compress=4, mixing=1``), overriding
            ``config``; the config's ``blocks`` is per layer and not taken here.
        init: ``kaiming`` (fresh), ``keep`` (copy the kept dense weights, data-free) or ``project``
            (the kept weights refitted, block by block, by ridge least squares to the dense layer's
            outputs on ``calibration`` data: see :mod:`xsurgery.surgery._project`; each layer is fitted
            to the dense model's own inputs, all collected from the dense model; the report's
            ``projection`` gives each layer's relative output error for keep and project).
        weights: a local file of dense weights (safetensors, a dense ``.xs`` checkpoint, or a torch
            file read with ``weights_only=True``) loaded into the model before the surgery.
        calibration: data for ``init="project"``: a tensor (one batch), an iterable of batches
            (tensors, dicts of keyword inputs, or a DataLoader's ``(x, y)``: labels ignored) or a
            training recipe (:func:`xsurgery.train.load_recipe`: batches of its training split).
            Default: the example input, with a warning.
        ridge: the projection's ridge, relative to the mean diagonal of each block's Gram matrix.
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
        The converted model (same class as the input; a ``torch.compile``'d input: its module's) and its :class:`~xsurgery.analysis.Report`.
    """
    from ..models import resolve as resolve_example

    model, name = _source(model, model_kwargs, pretrained, weights)
    if calibration is not None and init != "project":
        raise UserError("calibration data is used by init='project' only (--init project)")
    cfg = SparsityConfig.of(config, **sparsity)
    budget = budget_targets(cfg, target_macs, target_params, match_macs)
    spec = SurgerySpec.from_config(
        cfg, init=init, layers=_names(layers), include=_names(include), exclude=_names(exclude),
        include_stem=include_stem, include_classifier=include_classifier, min_channels=min_channels,
        plan=load_plan(plan),
    )
    model = _initialize_lazy(model, example_inputs)
    example = resolve_example(model, example_inputs, input_size)
    if budget is not None:
        spec, budget = fit_budget(model, spec, decide(model, spec, example)[0], example, budget,
                                  example_inputs=example_inputs, input_size=input_size)
    converted, decisions, trace = apply_surgery(model, spec, example)
    if not allow_none and not any(d.converted for d in decisions):
        raise UserError(_none_converted(decisions))
    projection = None
    if spec.init == "project":
        batches, from_example = calibration_batches(calibration, example)
        layers = project(model, converted, [d.name for d in decisions if d.converted], batches, ridge=ridge)
        projection = {"batches": len(batches), "ridge": ridge, "data": "example input" if from_example else "calibration",
                      "layers": layers}
    rep = _finish(model, converted, decisions, trace, example, name, check, budget)
    rep.projection = projection
    return converted, rep


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _source(model: nn.Module | str, model_kwargs: dict[str, Any] | None, pretrained: bool,
            weights: str | None = None) -> tuple[nn.Module, str]:
    """The model to convert and its name in the report (a source is built here, ``weights`` loaded)."""
    from ..models import create_model, load_weights

    if isinstance(model, str):
        if model.endswith((".xs", ".safetensors")):
            raise UserError("convert takes a model, not a checkpoint; use `xsurgery report` or `xsurgery export` on "
                            "checkpoints (a dense checkpoint's weights: convert MODEL --weights FILE)")
        return create_model(model, model_kwargs, pretrained, weights=weights), model
    if isinstance(model, nn.Module):
        if model_kwargs or pretrained:
            raise UserError("model_kwargs/pretrained only apply when the model is given by name")
        model = uncompiled(model)  # a torch.compile'd module: the one it wraps
        if weights is not None:  # the model passed in is not modified
            model = load_weights(deepcopy_model(model), weights)
        return model, type(model).__name__
    raise UserError(f"convert takes an nn.Module or a model name, got {type(model).__name__}")


def _initialize_lazy(model: nn.Module, example_inputs: Any) -> nn.Module:
    """Lazy modules take their shapes from the first call: make it on a copy, as the user's would."""
    from ..models import call
    from ..models import resolve as resolve_example

    lazy = [n for n, m in model.named_modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and m.has_uninitialized_params()]
    if not lazy:
        return model
    if example_inputs is None:
        raise UserError(f"the model has uninitialized lazy modules ({', '.join(lazy[:3])}); pass example_inputs= "
                        f"(--input SHAPE) so they initialize on it, or run the model once before converting")
    model = deepcopy_model(model)
    with torch.no_grad():
        call(model, resolve_example(model, example_inputs, None))
    return model


def _finish(model: nn.Module, converted: nn.Module, decisions: list[Decision], trace: Trace, example: Any,
            name: str, check: bool, budget: dict[str, Any] | None):
    """Record the example on the converted model, compare the outputs, and build the report."""
    from ..analysis import report as make_report
    from ..models import describe, per_sample_size

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
    return rep


def _none_converted(decisions: Sequence[Decision]) -> str:
    from collections import Counter

    if not decisions:
        return "the model has no conv/linear layer to convert; pass --allow-none (allow_none=True) to accept it unchanged"
    reasons = Counter((d.reason or "").split(" (")[0] for d in decisions)
    top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
    return (f"0 of {len(decisions)} layers converted ({top}); use --include/--plan to choose layers, "
            f"or pass --allow-none (allow_none=True) to accept it unchanged")
