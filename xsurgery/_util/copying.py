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

__all__ = ["deepcopy_model"]


def deepcopy_model(model: nn.Module) -> Any:
    """``copy.deepcopy(model)``, with computed (non-leaf) tensor attributes copied detached."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
