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
from ._prune import MACS_TOL, bisect_to_macs, forward_order, prune_to_macs, pruned_shapes, resize_modules, tp_prune

__all__ = [
    "MACS_TOL",
    "Decision",
    "KINDS",
    "LayerRule",
    "SurgerySpec",
    "apply_surgery",
    "bisect_to_macs",
    "check_outputs",
    "convert",
    "decide",
    "forward_order",
    "layer_rows",
    "load_plan",
    "project",
    "ridge_solve",
    "prune_to_macs",
    "pruned_shapes",
    "resize_modules",
    "tp_prune",
]
