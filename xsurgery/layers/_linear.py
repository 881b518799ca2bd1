"""XLinear: an ``nn.Linear`` (or transformers' ``Conv1D``) whose outputs read only D inputs each."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import XBase, check_init, copy_dense, keep_weights, sparsity_of
from ._config import SparsityConfig
from ._functional import x_linear

__all__ = ["XLinear", "is_conv1d_linear"]


def is_conv1d_linear(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): ``y = x @ W + b`` with ``W`` stored ``[in, out]``.

    Recognised by class name and module path so that transformers is never imported here.
    """
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)


class XLinear(XBase):
    """Expander-sparse ``nn.Linear`` on inputs of any leading shape.

    Arguments as :class:`~xsurgery.layers.XConv2d` (with ``in_features``/``out_features``).
    """

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: SparsityConfig | None = None,
        *,
        device=None,
        dtype=None,
        **sparsity: Any,
    ) -> None:
        super().__init__()
        config, graph = sparsity_of(config, sparsity)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_graph(self.in_features, self.out_features, config, graph)
        self._finish_init((self.out_features, self.degree), bias, device, dtype)

    def reset_parameters(self) -> None:
        """He (Kaiming normal, ReLU gain) with fan_in = D; the bias as nn.Linear's."""
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            bound = 1 / math.sqrt(self.degree)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        execution = self.resolved_execution()
        if execution == "masked" and (w := self._cached_dense(x)) is not None:
            return F.linear(x, w, self.bias)
        return x_linear(x, self.weight, self.index, self.bias, blocks=self.blocks,
                        execution=execution, in_features=self.in_features, skip_gather=self._identity)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        return f"{s}, {self.graph_repr()}"

    @classmethod
    def from_dense(
        cls, linear: nn.Module, config: SparsityConfig | None = None, *, init: str = "kaiming", **sparsity: Any,
    ) -> XLinear:
        """Build from a dense ``nn.Linear`` (or transformers' ``Conv1D``, a linear whose weight is
        stored ``[in, out]``); ``init`` as :meth:`XConv2d.from_dense`."""
        if is_conv1d_linear(linear):
            cin, cout = linear.weight.shape
            weight_oi = linear.weight.t()
        elif isinstance(linear, nn.Linear):
            cin, cout, weight_oi = linear.in_features, linear.out_features, linear.weight
        else:
            raise ValueError("XLinear.from_dense needs an nn.Linear or a transformers Conv1D")
        check_init(init)
        bias = getattr(linear, "bias", None)
        layer = cls(cin, cout, bias is not None, config, device=linear.weight.device, dtype=linear.weight.dtype,
                    **sparsity)
        if init == "keep":
            keep_weights(layer, weight_oi, bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent plain ``nn.Linear``."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        copy_dense(self, lin)
        return lin
