"""Training recipe files: YAML, variants and ``key=value`` overrides (the typed specs: ``_specs``).

A recipe file is YAML with the fields of :class:`Recipe` and, optionally, ``variants``: a
mapping from a variant name to dotted ``key: value`` overrides (e.g. ``dense: {surgery: null}``),
picked with ``--variant``. Command-line ``key=value`` overrides come last; their values are
parsed as YAML and typed by the dataclass fields, so ``optim.lr=0.05 epochs=3`` just works.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import fields
from typing import Any

from .._util.io import read_limited
from .._util.text import load_yaml, safe_repr, safe_text
from ..errors import UserError
from ._specs import RECIPE_VERSION, DataSpec, ModelSpec, OptimSpec, Recipe, ScheduleSpec, _hints, _surgery_type

__all__ = [
    "RECIPE_VERSION",
    "DataSpec",
    "ModelSpec",
    "OptimSpec",
    "Recipe",
    "ScheduleSpec",
    "apply_overrides",
    "load_recipe",
    "read_recipe_file",
    "recipe_to_yaml",
]

MAX_RECIPE_BYTES = 1 << 20


def _parse_value(text: str) -> Any:
    """A ``key=value`` value as YAML data (an alias, tag or invalid YAML stays the literal text)."""
    try:
        return load_yaml(text, "override")
    except UserError:
        return text


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested plain dict, checking every level against the dataclasses."""
    parts = key.split(".")
    cls: Any = Recipe
    node = d
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        prefix = here + "." if here else ""
        if cls is None:  # inside a free-form dict (model.kwargs, surgery.plan, ...)
            if i == len(parts) - 1:
                node[part] = value
                return
            node = node.setdefault(part, {})
            continue
        names = [f.name for f in fields(cls)]
        if part not in names:
            raise UserError(f"unknown key {safe_repr(key)}; valid: {', '.join(prefix + n for n in names)}")
        if i == len(parts) - 1:
            node[part] = value
            if cls is _surgery_type():  # compress and degree exclude each other
                other = {"compress": "degree", "degree": "compress"}.get(part)
                if other and value is not None:
                    node[other] = None
            return
        tp = _hints(cls)[part]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        target = inner[0]
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = target if dataclasses.is_dataclass(target) else None


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (or a ``{dotted key: value}`` mapping) to a recipe dict copy."""
    import copy

    out = copy.deepcopy(d)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key:
                raise UserError(f"override {safe_repr(text)} is not key=value (e.g. optim.lr=0.05 epochs=3)")
            items.append((key.strip(), _parse_value(raw)))
    for key, value in items:
        _set_dotted(out, key, value)
    return out


def read_recipe_file(path: str) -> dict[str, Any]:
    """The raw mapping of a recipe YAML file (``variants`` included)."""
    if not os.path.exists(path):
        alt = os.path.join("recipes", f"{path}.yaml")
        if os.path.isfile(alt):
            path = alt
        else:
            raise UserError(f"recipe {safe_text(path)} does not exist")
    raw = read_limited(path, MAX_RECIPE_BYTES, "recipe")  # a FIFO or device is refused, not read
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"recipe {safe_text(path)} is not UTF-8 text") from None
    d = load_yaml(text, f"recipe {safe_text(path)}")
    if not isinstance(d, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of recipe fields")
    return d


def load_recipe(path: str, overrides: list[str] | dict[str, Any] = (), variant: str | None = None) -> Recipe:
    """Read a recipe file, apply a variant's overrides, then the command-line ones.

    A selected variant appends ``-<variant>`` to the recipe's name (and so to its default
    output folder) unless it sets ``name`` itself.
    """
    d = read_recipe_file(path)
    variants = d.pop("variants", None) or {}
    if not isinstance(variants, dict):
        raise UserError(f"recipe {path}: variants must map a name to overrides")
    if variant is not None:
        if variant not in variants:
            have = ", ".join(variants) or "none"
            raise UserError(f"recipe {path} has no variant {safe_repr(variant)}; its variants: {have}")
        chosen = variants[variant] or {}
        if not isinstance(chosen, dict):
            raise UserError(f"recipe {path}: variant {safe_repr(variant)} must map dotted keys to values")
        d = apply_overrides(d, chosen)
        if "name" not in chosen:
            d["name"] = f"{d.get('name', 'run')}-{variant}"
    d = apply_overrides(d, list(overrides) if not isinstance(overrides, dict) else overrides)
    return Recipe.from_dict(d)


def list_variants(path: str) -> list[str]:
    """Variant names a recipe file defines."""
    return list((read_recipe_file(path).get("variants") or {}).keys())


def recipe_to_yaml(recipe: Recipe) -> str:
    """YAML text of the resolved recipe (what ``recipe.yaml`` beside the outputs holds)."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
