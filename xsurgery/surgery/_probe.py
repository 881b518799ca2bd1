"""What one run of the example shows about the layers, whatever an fx trace managed.

fx fails on many models (every transformers-5 model), so the roles that matter for safety
are also observed on a real run:

- a layer whose ``weight`` is consumed by an op outside its own forward (``x @ layer.weight.T``,
  MobileBERT's LM head, Mamba's ``dt_proj``) must stay dense: an X-layer's compact weight is
  not the dense matrix the code expects;
- a layer that reads the model's raw floating input (through views only) is the stem;
- a conv/linear subclass with its own ``forward`` (transformers' ``FalconLinear``) that computes
  exactly what its torch base class computes, on every call of the example, can be replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..layers import layer_kind

__all__ = ["Probe", "probe_layers"]


@dataclass
class Probe:
    """Findings of one example run (``ran`` False: the model failed on it; nothing was found)."""

    ran: bool = False
    direct: dict[str, str] = field(default_factory=dict)  # layer -> the op that read its weight outside it
    raw_input: set[str] = field(default_factory=set)  # layers fed the model's raw floating input
    same_forward: set[str] = field(default_factory=set)  # custom subclasses computing their base's forward
    differs: set[str] = field(default_factory=set)  # custom subclasses that do not


# reading a weight's metadata is no use of its values
_METADATA = {"size", "dim", "numel", "nelement", "ndimension", "element_size", "is_floating_point", "is_complex",
             "is_contiguous", "data_ptr", "stride", "storage_offset", "get_device", "untyped_storage", "__len__",
             "__format__", "__repr__", "__hash__", "type"}
_VALUE_ATTRIBUTES = {"T", "mT", "H", "mH", "data", "real"}


def _reads_values(func: Any) -> bool:
    name = getattr(func, "__name__", None) or ""
    if name == "__get__":
        return str(getattr(getattr(func, "__self__", None), "__name__", "")) in _VALUE_ATTRIBUTES
    return name not in _METADATA


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # an attribute such as .T / .mT
        return "." + str(getattr(getattr(func, "__self__", None), "__name__", "attribute"))
    return "matmul" if name in ("__matmul__", "__rmatmul__") else name


class _WeightReads(TorchFunctionMode):
    """Notes every op that consumes a watched weight while its layer is not running."""

    def __init__(self, owners: dict[int, str], active: list[str], found: dict[str, str]) -> None:
        super().__init__()
        self.owners, self.active, self.found = owners, active, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)) if _reads_values(func) else ():
            if isinstance(leaf, torch.Tensor):
                owner = self.owners.get(id(leaf))
                if owner is not None and owner not in self.active and owner not in self.found:
                    self.found[owner] = _op_name(func)
        return func(*args, **kwargs)


def _storages(example: tuple[tuple, dict]) -> set[int]:
    out = set()
    for t in tree_leaves(example):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not t.is_meta:  # meta: no storage
            out.add(t.untyped_storage().data_ptr())
    return out


@torch.no_grad()
def probe_layers(model: nn.Module, example: tuple[tuple, dict] | None, custom: set[str]) -> Probe:
    """Run ``model`` once (eval mode, modes restored) on ``example`` and watch the layers.

    Args:
        custom: names of the candidate layers whose forward differs from their base class's;
            each call's output is compared with the base class's forward on the same input.
    """
    probe = Probe()
    if example is None:
        return probe
    layers = {n: m for n, m in model.named_modules() if layer_kind(m) is not None}
    owners = {id(m.weight): n for n, m in layers.items()
              if isinstance(m._parameters.get("weight"), torch.Tensor)}
    raw = _storages(example)
    active: list[str] = []
    checked: dict[str, bool] = {}

    def pre(name: str):
        def hook(m: nn.Module, args) -> None:
            active.append(name)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and not x.is_meta \
                    and x.untyped_storage().data_ptr() in raw:
                probe.raw_input.add(name)
        return hook

    def post(name: str):
        def hook(m: nn.Module, args, out) -> None:
            if name in custom and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                base = layer_kind(m).base
                try:
                    ref = base.forward(m, *args)
                    same = ref.shape == out.shape and bool(torch.allclose(ref, out, rtol=1e-4, atol=1e-5))
                except Exception:
                    same = False
                checked[name] = checked.get(name, True) and same
            if active and active[-1] == name:
                active.pop()
        return hook

    handles = []
    for n, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre(n)))
        handles.append(m.register_forward_hook(post(n), always_call=True))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        from ..models import call

        with _WeightReads(owners, active, probe.direct):
            call(model, example)
        probe.ran = True
    except Exception:
        probe.direct.clear()  # a failed run proves nothing; the output check names the failure
        probe.raw_input.clear()
        checked.clear()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    probe.same_forward = {n for n, ok in checked.items() if ok}
    probe.differs = {n for n, ok in checked.items() if not ok}
    return probe
