"""Deep copies of models that hold computed tensors.

``torch.nn.utils.prune`` and the legacy ``weight_norm`` / ``spectral_norm`` keep ``weight`` as a
plain attribute computed from other parameters (a non-leaf tensor with a ``grad_fn``), which
``copy.deepcopy`` refuses ("Only Tensors created explicitly by the user support the deepcopy
protocol"). Their forward pre-hook recomputes it before every call, so a detached copy of the
value is exact.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["deepcopy_model", "uncompiled"]


def deepcopy_model(model: nn.Module) -> Any:
    """``copy.deepcopy(model)``, with computed (non-leaf) tensor attributes copied detached."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def uncompiled(model: Any) -> Any:
    """The module a ``torch.compile``'d one wraps (its ``_orig_mod``: the same parameters), else ``model``.

    Surgery, export and load work on the module itself: the compiled wrapper recompiles on every
    changed layer, the TorchScript exporter refuses it, and its state-dict keys carry a
    ``_orig_mod.`` prefix. Compile the result again if wanted.
    """
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    wrapper = getattr(compiled, "OptimizedModule", None)
    return model._orig_mod if wrapper is not None and isinstance(model, wrapper) else model
