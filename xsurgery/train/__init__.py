"""Training: a recipe (``_recipe``: YAML -> the typed specs of ``_specs``) builds the datasets
(``data``: a registry of named datasets; ``_images`` reads their files) and the model, and the
loop (``_loop``) trains it from scratch in phases, resumable, on one process or many
(``_distributed``: DDP under ``torchrun``), committing every epoch atomically (``_state``) and
scoring the run (``_results``).

``xsurgery train recipes/<name>.yaml`` is the command line; :func:`train` the Python entry.
"""

from __future__ import annotations

from ._build import build_model, build_teacher, distill_loss
from ._loop import lr_at, train
from ._recipe import Recipe, apply_overrides, load_recipe, read_recipe_file, recipe_to_yaml
from ._results import final_line
from ._state import BEST, CHECKPOINT, RESULT, STATE_JSON
from .data import build_splits

__all__ = ["BEST", "CHECKPOINT", "RESULT", "STATE_JSON", "Recipe", "apply_overrides", "build_model", "build_splits", "build_teacher",
           "distill_loss", "final_line", "load_recipe", "lr_at", "read_recipe_file", "recipe_to_yaml", "train"]
