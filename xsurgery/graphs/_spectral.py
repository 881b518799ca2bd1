"""What a graph does for a network: input coverage, spectral gap, and the sensitivity depth of
a chain of layers (Theorem 3.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ._core import BipartiteGraph

__all__ = ["input_coverage", "sensitivity_depth", "spectral_gap"]


def input_coverage(graph: BipartiteGraph) -> float:
    """Fraction of the inputs that at least one block reads."""
    return float(torch.unique(graph.index).numel()) / graph.in_features


def spectral_gap(graph: BipartiteGraph) -> float:
    """``1 - s2/s1`` of the degree-normalised block-by-input biadjacency.

    Blocks stand for their outputs: repeating a row scales every singular value alike, so
    the output-level gap is the same. A graph that leaves an input unread is disconnected
    (gap 0); with a single block that reads every input the graph is complete (gap 1).
    """
    if input_coverage(graph) < 1.0:
        return 0.0
    mat = graph.biadjacency()
    row = mat.sum(axis=1)
    col = mat.sum(axis=0)
    norm = mat / np.sqrt(row)[:, None] / np.sqrt(col)[None, :]
    gram = norm @ norm.T if norm.shape[0] <= norm.shape[1] else norm.T @ norm
    ev = np.sort(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]
    if ev.size < 2:
        return 1.0
    s1, s2 = math.sqrt(ev[0]), math.sqrt(ev[1])
    return float(max(0.0, 1.0 - s2 / s1)) if s1 > 0 else 0.0


def sensitivity_depth(graphs: Sequence[BipartiteGraph]) -> float:
    """Smallest depth d after which every output depends on every input (Theorem 3.1).

    ``graphs`` is a chain (layer l+1 reads the outputs of layer l). Returns the smallest
    d such that every output of layer d is connected to every input of layer 1 through
    layers 1..d, or ``math.inf`` when no prefix of the chain achieves it.
    """
    reach: torch.Tensor | None = None
    for depth, g in enumerate(graphs, start=1):
        m = g.mask().to(torch.float32)
        if reach is not None:
            if m.shape[1] != reach.shape[0]:
                raise ValueError(
                    f"layer {depth} reads {m.shape[1]} channels but layer {depth - 1} "
                    f"writes {reach.shape[0]}"
                )
            m = ((m @ reach) > 0).to(torch.float32)
        reach = m
        if bool((reach > 0).all()):
            return depth
    return math.inf
