"""Sweep variants: named sets of recipe overrides, from the recipe's own ``variants:`` or from
the built-in families (``dense@w``, ``grouped@C``, ``x@C``, ``wide-x@w``, ``tp@C``,
``unstructured@C``), each registered."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

__all__ = ["Variant", "list_families", "parse_variant", "register_family"]

# model kwargs that scale a family's width, in the order they are looked for
WIDTH_KNOBS = ("width_mult", "widen_factor", "width", "hidden")
SURGERY_OPTIONS = ("mixing", "graph", "mix_points", "execution", "seed", "layers")
COMPRESSION_FAMILIES = ("x", "grouped", "tp", "unstructured")  # their value is a compression (>= 1)


@dataclass(frozen=True)
class Variant:
    """One point of a sweep: a name, the recipe overrides that make it, and how it is built.

    ``target`` is set by families that size the model to a budget after the overrides
    (``wide-x``: the dense model's MACs), resolved when the sweep builds the run.
    """

    name: str
    family: str
    overrides: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    value: float | None = None
    after: str | None = None  # "dense": starts from the dense variant's trained run at the same seed
    accuracy_only: bool = False  # not exported, timed or put on a front (unstructured sparsity)


Family = Callable[[float, dict[str, Any], dict[str, Any]], tuple[dict[str, Any], str | None]]


@dataclass(frozen=True)
class _Family:
    fn: Family
    help: str
    options: tuple[str, ...]
    after: str | None
    accuracy_only: bool


_FAMILIES: dict[str, _Family] = {}


def register_family(name: str, help: str, *, options: tuple[str, ...] = SURGERY_OPTIONS, after: str | None = None,
                    accuracy_only: bool = False) -> Callable[[Family], Family]:
    """Register ``fn(value, options, recipe_dict) -> (overrides, budget target or None)`` as
    ``name@value[:k=v,...]``, ``k`` one of ``options``. ``after="dense"``: its runs start from the
    dense variant's trained run at the same seed (the sweep trains that first)."""

    def add(fn: Family) -> Family:
        if name in _FAMILIES:
            raise ValueError(f"variant family {name!r} is already registered")
        _FAMILIES[name] = _Family(fn, help, tuple(options), after, accuracy_only)
        return fn

    return add


def list_families() -> dict[str, str]:
    return {k: f.help for k, f in _FAMILIES.items()}


def _width_overrides(width: float, recipe: dict[str, Any]) -> dict[str, Any]:
    kwargs = (recipe.get("model") or {}).get("kwargs") or {}
    knob = next((k for k in WIDTH_KNOBS if k in kwargs), None)
    if knob is None:
        raise UserError(f"a width variant needs the model's width knob in the recipe: set model.kwargs."
                        f"{WIDTH_KNOBS[0]} (or {', '.join(WIDTH_KNOBS[1:])})")
    base = kwargs[knob]
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise UserError(f"model.kwargs.{knob} must be a number to scale, got {base!r}")
    scaled = max(1, round(base * width)) if isinstance(base, int) else base * width
    return {f"model.kwargs.{knob}": scaled}


def _surgery(recipe: dict[str, Any], compress: float, options: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    base = dict(recipe.get("surgery") or {})
    base.pop("degree", None)
    base.update(compress=compress, **fixed)
    base.update(options)
    return {"surgery": base}


@register_family("dense", "dense@w: the dense model at width multiplier w (the dense frontier)")
def _dense(value: float, options: dict[str, Any], recipe: dict[str, Any]):
    return {"surgery": None, **(_width_overrides(value, recipe) if value != 1 else {})}, None


@register_family("x", "x@C: X-layers at compression C (options :mixing=1,mix_points=chain,graph=paired)")
def _x(value: float, options: dict[str, Any], recipe: dict[str, Any]):
    return _surgery(recipe, value, {"mixing": 2, **options}), None


@register_family("grouped", "grouped@C: grouped convolutions at compression C (no mixing)")
def _grouped(value: float, options: dict[str, Any], recipe: dict[str, Any]):
    return _surgery(recipe, value, options, graph="grouped", mixing=1), None


@register_family("wide-x", "wide-x@w: the model widened by w, converted back to the dense model's MACs")
def _wide_x(value: float, options: dict[str, Any], recipe: dict[str, Any]):
    over = _width_overrides(value, recipe)
    over.update(_surgery(recipe, 1.0, {"mixing": 2, **options}))
    return over, "dense-macs"


TP_OPTIONS = ("epochs", "lr", "round_to")


@register_family("tp", "tp@C: the trained dense run pruned (Torch-Pruning) to x@C's MACs, then fine-tuned "
                 "(options :epochs=N (default a quarter of the recipe's), lr= (default a tenth), round_to=8)",
                 options=TP_OPTIONS, after="dense")
def _tp(value: float, options: dict[str, Any], recipe: dict[str, Any]):
    epochs = options.get("epochs", max(1, round(int(recipe.get("epochs", 10)) / 4)))
    lr = options.get("lr", float((recipe.get("optim") or {}).get("lr", 0.1)) / 10)
    over = {"surgery": None, "epochs": epochs, "optim.lr": lr, "schedule.warmup_epochs": 0,
            "prune": {"target_macs": 1, "round_to": options.get("round_to")}}
    return over, "x-macs"


@register_family("unstructured", "unstructured@C: the layers x@C converts kept dense, each trained with a random "
                 "unstructured mask of its X-layer's density (accuracy only)", options=(), accuracy_only=True)
def _unstructured(value: float, options: dict[str, Any], recipe: dict[str, Any]):
    return {**_surgery(recipe, value, {"mixing": 2}), "unstructured": True}, None


_SPEC = re.compile(r"^(?P<family>[a-z][a-z0-9-]*)@(?P<value>[0-9]*\.?[0-9]+)(?::(?P<opts>.+))?$")


def _parse_options(text: str | None, name: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    from .._util.text import load_yaml

    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        if not sep or key not in allowed:
            raise UserError(f"variant {name!r}: option {part!r} is not one of {', '.join(allowed) or '(none)'} "
                            f"as key=value (e.g. x@4:mixing=1)")
        out[key] = load_yaml(raw, f"variant {name!r} option {key}") if raw else raw
    return out


def parse_variant(text: str, recipe: dict[str, Any]) -> Variant:
    """A variant from its name: one of the recipe's ``variants:`` or ``family@value[:k=v,...]``."""
    named = recipe.get("variants") or {}
    if text in named:
        return Variant(text, "recipe", dict(named[text] or {}))
    m = _SPEC.match(text)
    if m is None or m["family"] not in _FAMILIES:
        known = ", ".join([*named, *(f"{f}@N" for f in _FAMILIES)])
        raise UserError(f"unknown variant {text!r}; use one of {known}")
    value = float(m["value"])
    if value <= 0 or (m["family"] in COMPRESSION_FAMILIES and value < 1):
        raise UserError(f"variant {text!r}: the value must be > 0 (a compression >= 1)")
    fam = _FAMILIES[m["family"]]
    overrides, target = fam.fn(value, _parse_options(m["opts"], text, fam.options), recipe)
    return Variant(text, m["family"], overrides, target, value, fam.after, fam.accuracy_only)
