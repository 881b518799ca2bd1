"""What a user would pick instead of xsurgery, at the X-model's MACs: thinner dense models.

* ``thin``: the same architecture with every channel count scaled by one width factor
  (the first channels kept), the factor found by bisection so that the MACs match.
  Needs no extra package; works where channels flow through convs, norms, pooling,
  elementwise ops and a final classifier (torchvision/timm CNNs), and says so otherwise.
* ``tp`` / ``tp8``: Torch-Pruning (optional extra ``torch-pruning``) with its usual set-up,
  L2-magnitude importance and one pruning ratio for every layer (the classifier kept), the
  ratio found by bisection to the same MACs; ``tp8`` rounds every width to a multiple of 8
  (``round_to=8``), which runtimes with 8/16-channel blocked kernels prefer.

MACs are the report's (:func:`xsurgery.bench.count_macs`), matched within :data:`MACS_TOL`
(``tp8``: the nearest width step, however far; the result's ``macs_ratio`` says what was
reached).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..surgery import MACS_TOL, bisect_to_macs, forward_order, tp_prune

BASELINES = ("thin", "tp", "tp8")
# round_to=8 moves the MACs in steps (a 64-channel layer has only 8 widths): tp8 takes the
# nearest step whatever its distance; its macs_ratio in the results says where it landed
MACS_TOL_ROUNDED = math.inf


def _width(c: int, w: float) -> int:
    return max(1, int(round(c * w)))


def thin(model: nn.Module, width: float, x: Any, call: Callable) -> nn.Module:
    """A copy with every inner channel count ``c`` as ``round(c * width)`` (first channels kept).

    The first conv/linear keeps its inputs, the last one its outputs (the classes).
    Raises UserError where the channels do not line up (a flatten of spatial maps, heads).
    """
    order = forward_order(model, x, call)
    if not order:
        raise UserError("thin needs a model with conv or linear layers")
    first, last = order[0], order[-1]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in list(out.named_modules()):
            if isinstance(m, nn.modules.conv._ConvNd):
                c_in = m.in_channels if name == first else _width(m.in_channels, width)
                c_out = m.out_channels if name == last else _width(m.out_channels, width)
                groups = m.groups
                if groups > 1:
                    if groups == m.in_channels == m.out_channels:  # depthwise: stays depthwise
                        groups = c_in = c_out = min(c_in, c_out)
                    else:
                        per = max(1, c_in // groups)
                        groups = max(1, c_in // per)
                        while c_in % groups or c_out % groups:
                            groups -= 1
                m.weight = nn.Parameter(m.weight[:c_out, :c_in // groups].clone())
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias[:c_out].clone())
                m.in_channels, m.out_channels, m.groups = c_in, c_out, groups
            elif isinstance(m, nn.Linear):
                c_in = m.in_features if name == first else _width(m.in_features, width)
                c_out = m.out_features if name == last else _width(m.out_features, width)
                m.weight = nn.Parameter(m.weight[:c_out, :c_in].clone())
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias[:c_out].clone())
                m.in_features, m.out_features = c_in, c_out
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = _width(m.num_features, width)
                for attr in ("weight", "bias"):
                    if getattr(m, attr) is not None:
                        setattr(m, attr, nn.Parameter(getattr(m, attr)[:c].clone()))
                for attr in ("running_mean", "running_var"):
                    if getattr(m, attr) is not None:
                        setattr(m, attr, getattr(m, attr)[:c].clone())
                m.num_features = c
    try:
        with torch.no_grad():
            call(out.eval(), x)
    except Exception as exc:
        raise UserError(f"thin: the channels of this model do not thin uniformly ({str(exc).splitlines()[0][:160]}); "
                        "leave out the thin variant") from exc
    return out


def baseline(kind: str, dense: nn.Module, target_macs: int, x: Any, macs: Callable[[nn.Module], int],
             call: Callable) -> tuple[nn.Module, dict[str, Any]]:
    """The ``kind`` baseline of ``dense`` at ``target_macs``; returns the model and how it was made."""
    if kind == "thin":
        model, w = bisect_to_macs(lambda w: thin(dense, w, x, call), macs, target_macs, 0.05, 1.0, shrink=False)
        return model, {"width": round(w, 4)}
    if kind in ("tp", "tp8"):
        try:
            import torch_pruning  # noqa: F401
        except ImportError as exc:
            raise UserError("the tp variants need Torch-Pruning: pip install 'xsurgery[tp]'") from exc
        if not isinstance(x, torch.Tensor):
            raise UserError("the tp variants need a single tensor input")
        round_to = 8 if kind == "tp8" else None
        model, r = bisect_to_macs(lambda r: tp_prune(dense, r, x, round_to), macs, target_macs, 0.0, 0.95, shrink=True,
                           tol=MACS_TOL_ROUNDED if round_to else MACS_TOL)
        return model, {"pruning_ratio": round(r, 4), "round_to": round_to}
    raise UserError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
