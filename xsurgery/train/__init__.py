"""Training: a recipe (``_recipe``: YAML -> typed specs) builds the datasets (``data``) and the
model, and the loop (``_loop``) trains it from scratch, resumable, on one process or many
(``_distributed``: DDP under ``torchrun``), committing every epoch atomically (``_state``).

``xsurgery train recipes/<name>.yaml`` is the command line; :func:`train` the Python entry.
"""

from __future__ import annotations

from ._loop import build_model, final_line, lr_at, train
from ._recipe import Recipe, load_recipe, recipe_to_yaml
from ._state import BEST, CHECKPOINT, RESULT

__all__ = ["BEST", "CHECKPOINT", "RESULT", "Recipe", "build_model", "final_line", "load_recipe", "lr_at",
           "recipe_to_yaml", "train"]
