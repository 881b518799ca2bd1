"""Bipartite expander graphs that decide which inputs each block of outputs reads.

A layer with ``in_features`` inputs and ``out_features`` outputs is split into ``blocks``
(G) equal blocks of outputs; every output of block ``g`` reads the ``degree`` (D) inputs
``index[g]``.  ``mixing`` (k) = G * D / C_in is how many blocks read each input.

Constructions are pure functions of (sizes, degree, blocks, seed) that use their own
``torch.Generator``; they are registered by name (:func:`register_graph`,
:func:`list_graphs`, :func:`build_graph`).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "BipartiteGraph",
    "GraphConstruction",
    "build_graph",
    "choose_blocks",
    "degree_for",
    "generator",
    "graph_construction",
    "layer_seed",
    "list_graphs",
    "min_covering_degree",
    "register_graph",
    "register_graph_chooser",
]


@dataclass(frozen=True, eq=False)
class BipartiteGraph:
    """Which inputs each block of outputs reads.

    Attributes:
        in_features: number of inputs C_in.
        out_features: number of outputs C_out.
        degree: inputs read by every output (D).
        blocks: number of output blocks (G); C_out is a multiple of it.
        index: ``[G, D]`` int64 tensor; row g lists the inputs of block g (no repeats).
        construction: registered name of the construction that made it.
        seed: seed it was built from (``None`` for seed-free constructions).
    """

    in_features: int
    out_features: int
    degree: int
    blocks: int
    index: torch.Tensor
    construction: str
    seed: int | None

    @property
    def mixing(self) -> float:
        """Average number of blocks that read each input (k)."""
        return self.blocks * self.degree / self.in_features

    @property
    def block_size(self) -> int:
        return self.out_features // self.blocks

    def biadjacency(self) -> np.ndarray:
        """Block-level ``[G, C_in]`` 0/1 matrix (row g = inputs of block g)."""
        mat = np.zeros((self.blocks, self.in_features), dtype=np.float64)
        rows = np.repeat(np.arange(self.blocks), self.degree)
        mat[rows, self.index.reshape(-1).numpy()] = 1.0
        return mat

    def mask(self) -> torch.Tensor:
        """Output-level ``[C_out, C_in]`` boolean connectivity."""
        m = torch.zeros(self.blocks, self.in_features, dtype=torch.bool)
        m.scatter_(1, self.index, True)
        return m.repeat_interleave(self.block_size, dim=0)

    def hash(self) -> str:
        """Short stable hash of the index, for manifests and ONNX metadata."""
        data = self.index.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
        head = f"{self.in_features},{self.out_features},{self.degree},{self.blocks};".encode()
        return hashlib.sha256(head + data).hexdigest()[:16]

    def is_identity(self) -> bool:
        """True when the gathered channels are the inputs in order (no gather needed)."""
        flat = self.index.reshape(-1)
        return flat.numel() == self.in_features and bool(
            torch.equal(flat, torch.arange(self.in_features))
        )

    def __repr__(self) -> str:
        return (
            f"BipartiteGraph({self.in_features}, {self.out_features}, degree={self.degree}, "
            f"blocks={self.blocks}, graph={self.construction}, seed={self.seed})"
        )


GraphFn = Callable[[int, int, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class GraphConstruction:
    """A registered construction and the constraints it declares (nothing else tests its name).

    Attributes:
        name: registry key (``--graph``).
        fn: ``fn(in_features, out_features, degree, blocks, seed) -> index[G, D]``.
        summary: one line for ``--graph`` help and docs.
        mixing: a fixed mixing k (``grouped``: 1, ``paired``: 2), or ``None`` to take the request.
        one_block_per_output: G = C_out (the paper's exact layer).
        power_of_two_blocks: G must be a power of two no larger than C_in (``cayley``).
        seeded: the construction draws from its seed (a seed-free one records ``seed=None``).
        expander: a seeded mixing graph that ``mix_points="chain"`` may replace by contiguous
            blocks at a chain's mix point (``random``, ``paired``, ``auto``).
        pick: a chooser instead of a construction: ``pick(in, out, degree, blocks)`` names the
            registered construction each layer gets (``auto``); the graph records that name.
    """

    name: str
    fn: GraphFn
    summary: str = ""
    mixing: int | None = None
    one_block_per_output: bool = False
    power_of_two_blocks: bool = False
    seeded: bool = True
    expander: bool = False
    pick: Callable[[int, int, int, int], str] | None = None


_GRAPHS: dict[str, GraphConstruction] = {}


def register_graph(
    name: str, *, summary: str = "", mixing: int | None = None, one_block_per_output: bool = False,
    power_of_two_blocks: bool = False, seeded: bool = True, expander: bool = False,
) -> Callable[[GraphFn], GraphFn]:
    """Register ``fn(in_features, out_features, degree, blocks, seed) -> index[G, D]`` with the
    constraints it declares (see :class:`GraphConstruction`); a duplicate name raises."""

    def deco(fn: GraphFn) -> GraphFn:
        if name in _GRAPHS:
            raise ValueError(f"graph construction {name!r} is already registered")
        _GRAPHS[name] = GraphConstruction(name, fn, summary or (fn.__doc__ or "").strip().split("\n")[0], mixing,
                                          one_block_per_output, power_of_two_blocks, seeded, expander)
        return fn

    return deco


def register_graph_chooser(name: str, *, summary: str = "") -> Callable[[Callable[[int, int, int, int], str]], Any]:
    """Register ``pick(in_features, out_features, degree, blocks) -> construction name``: a graph
    name that resolves per layer to a registered construction (``auto``)."""

    def deco(pick: Callable[[int, int, int, int], str]) -> Callable[[int, int, int, int], str]:
        if name in _GRAPHS:
            raise ValueError(f"graph construction {name!r} is already registered")
        _GRAPHS[name] = GraphConstruction(name, _no_fn, summary or (pick.__doc__ or "").strip().split("\n")[0],
                                          expander=True, pick=pick)
        return pick

    return deco


def _no_fn(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    raise AssertionError("a chooser resolves to a construction before it is built")


def list_graphs() -> list[str]:
    """Names of the registered constructions."""
    return sorted(_GRAPHS)


def graph_construction(name: str) -> GraphConstruction:
    """The registered construction ``name`` (unknown: a ``ValueError`` listing the known ones)."""
    if name not in _GRAPHS:
        raise ValueError(f"unknown graph {name!r}; choose one of {', '.join(list_graphs())}")
    return _GRAPHS[name]


def generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) % (2**63))
    return gen


def layer_seed(global_seed: int, name: str) -> int:
    """Per-layer seed from the global seed and a qualified module name (stable everywhere)."""
    digest = hashlib.sha256(f"{int(global_seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def degree_for(in_features: int, compress: float | None = None, degree: int | None = None) -> int:
    """Degree D from a compression C (D = C_in // C, at least 1) or an explicit degree."""
    if (compress is None) == (degree is None):
        raise ValueError("give exactly one of compress (e.g. compress=2) or degree (e.g. degree=64)")
    if degree is not None:
        if int(degree) != degree or degree < 1:
            raise ValueError(f"degree must be a positive integer, got {degree}; use degree >= 1")
        if degree > in_features:
            raise ValueError(
                f"degree {degree} is larger than the {in_features} input channels; "
                f"use degree <= {in_features}"
            )
        return int(degree)
    if not isinstance(compress, (int, float)) or not math.isfinite(compress) or compress < 1:
        raise ValueError(f"compression must be >= 1 (1 keeps the layer dense), got {compress}")
    return max(1, int(in_features // compress))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _allowed_blocks(in_features: int, out_features: int, rule: GraphConstruction | None) -> list[int]:
    """Block counts a construction can use for these sizes (divisors of C_out, ascending)."""
    if rule is not None and rule.one_block_per_output:
        return [out_features]
    candidates = _divisors(out_features)
    if rule is not None and rule.power_of_two_blocks:
        candidates = [d for d in candidates if d & (d - 1) == 0 and d <= in_features]
    return candidates or [1]


def min_covering_degree(in_features: int, out_features: int, graph: str = "random") -> int:
    """Smallest degree D with which some allowed block count G reads every input (G * D >= C_in).

    A converted layer never leaves an input unread (input coverage 1): with at most
    ``G_max`` blocks (C_out, or fewer for ``cayley``), D must be at least ``ceil(C_in / G_max)``.
    """
    rule = _GRAPHS.get(graph)
    return max(1, math.ceil(in_features / max(_allowed_blocks(in_features, out_features, rule))))


def choose_blocks(
    in_features: int, out_features: int, degree: int, mixing: int, graph: str = "random"
) -> int:
    """Block count G for a degree and a mixing k: G = k * C_in / D, adjusted to divide C_out.

    G is never below ``ceil(C_in / D)``, so that G * D >= C_in and every input is read (input
    coverage 1, at every mixing and degree); a degree too small for any allowed G raises a
    ``ValueError`` naming the smallest degree that covers (:func:`min_covering_degree`). When
    the target does not divide ``out_features`` the nearest allowed divisor is taken (ties go to
    the larger, which mixes more) and a warning says so.
    """
    rule = graph_construction(graph) if graph in _GRAPHS else None
    if rule is not None and rule.mixing is not None:
        mixing = rule.mixing
    if int(mixing) != mixing or mixing < 1:
        raise ValueError(f"mixing must be a positive integer, got {mixing}; use mixing >= 1")
    need = math.ceil(in_features / degree)
    allowed = _allowed_blocks(in_features, out_features, rule)
    covering = [d for d in allowed if d >= need]
    if not covering:
        raise ValueError(
            f"degree {degree} leaves inputs unread: {in_features}->{out_features} has at most "
            f"{max(allowed)} blocks, which read {max(allowed) * degree} of {in_features} inputs; "
            f"use degree >= {min_covering_degree(in_features, out_features, graph)}"
        )
    if rule is not None and rule.one_block_per_output:
        return out_features
    target = max(mixing * in_features / degree, need)
    best = min(covering, key=lambda d: (abs(math.log(d / target)), -d))
    if best != mixing * in_features / degree:
        why = " (fewer would leave inputs unread)" if need > mixing * in_features / degree else ""
        warnings.warn(
            f"{in_features}->{out_features} with degree {degree}, mixing {mixing}: "
            f"{mixing * in_features / degree:g} blocks do not divide {out_features} outputs{why}; using {best} blocks "
            f"(mixing {best * degree / in_features:g})",
            stacklevel=2,
        )
    return best


def build_graph(
    in_features: int,
    out_features: int,
    degree: int,
    blocks: int | None = None,
    *,
    mixing: int = 2,
    construction: str = "random",
    seed: int = 0,
) -> BipartiteGraph:
    """Build a registered construction.

    Args:
        in_features: C_in.
        out_features: C_out.
        degree: D, inputs per output (1 <= D <= C_in).
        blocks: G; when ``None`` it follows from ``mixing`` (see :func:`choose_blocks`).
        mixing: k, blocks reading each input, used when ``blocks`` is ``None``.
        construction: one of :func:`list_graphs`.
        seed: seed of the construction's own generator.
    """
    rule = graph_construction(construction)
    if in_features < 1 or out_features < 1:
        raise ValueError(f"channel counts must be positive, got {in_features}->{out_features}")
    degree = degree_for(in_features, degree=degree)
    if blocks is None:
        blocks = choose_blocks(in_features, out_features, degree, mixing, construction)
    if blocks < 1 or out_features % blocks:
        raise ValueError(
            f"blocks={blocks} must divide the {out_features} outputs; "
            f"choose one of {_divisors(out_features)}"
        )
    if blocks * degree < in_features:
        raise ValueError(
            f"blocks={blocks} x degree={degree} read at most {blocks * degree} of {in_features} inputs; "
            f"every input must be read: use blocks >= {math.ceil(in_features / degree)} or degree >= "
            f"{math.ceil(in_features / blocks)}"
        )
    if rule.pick is not None:
        construction = rule.pick(in_features, out_features, degree, blocks)
        rule = graph_construction(construction)
    index = rule.fn(in_features, out_features, degree, blocks, seed)
    index = index.to(torch.int64).contiguous()
    assert index.shape == (blocks, degree), (construction, index.shape)
    if torch.unique(index).numel() != in_features:  # a construction must cover every input
        raise ValueError(f"{construction} graph {in_features}->{out_features} (degree {degree}, {blocks} blocks) "
                         f"leaves inputs unread; use another --graph")
    return BipartiteGraph(
        in_features, out_features, degree, blocks, index, construction,
        int(seed) if rule.seeded else None,
    )


