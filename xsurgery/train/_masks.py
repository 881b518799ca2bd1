"""Unstructured random sparsity at the X-layers' densities: the reference row of the literature.

Each layer the surgery would convert stays dense and keeps a seeded random subset of its
weights, as many as its X-layer has (``degree / (in_channels / groups)`` of them), the rest
held at zero through training: the mask is applied once at the start and again after every
optimizer step. The masks are rebuilt from the recipe's seed, so a resumed run continues with
the same ones; the saved model is the dense one, with zeros.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ..layers import X_LAYERS

__all__ = ["apply_masks", "unstructured_masks"]


def unstructured_masks(dense: nn.Module, converted: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Per converted layer name: a 0/1 mask of the dense weight's shape with exactly as many ones
    as the X-layer's weight has entries, placed uniformly at random (seeded by ``seed`` and the name)."""
    modules = dict(dense.named_modules())
    masks = {}
    for name, x in converted.named_modules():
        if not isinstance(x, X_LAYERS):
            continue
        w = modules[name].weight
        keep = x.weight.numel()
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        flat = torch.zeros(w.numel(), dtype=w.dtype)
        flat[torch.randperm(w.numel(), generator=g)[:keep]] = 1
        masks[name] = flat.view_as(w)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight (in place)."""
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        w.mul_(mask.to(w.device, w.dtype))
