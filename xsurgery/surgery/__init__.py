"""Surgery: which layers to convert (plan, spec, decisions) and the rewrite of the model."""

from __future__ import annotations

from ._convert import (
    KINDS,
    Decision,
    LayerRule,
    SurgerySpec,
    apply_surgery,
    check_outputs,
    convert,
    decide,
    layer_rows,
    load_plan,
    project,
    ridge_solve,
)

__all__ = [
    "Decision",
    "KINDS",
    "LayerRule",
    "SurgerySpec",
    "apply_surgery",
    "check_outputs",
    "convert",
    "decide",
    "layer_rows",
    "load_plan",
    "project",
    "ridge_solve",
]
