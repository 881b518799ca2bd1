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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BipartiteGraph",
    "build_graph",
    "cayley_spectrum",
    "choose_blocks",
    "degree_for",
    "input_coverage",
    "layer_seed",
    "list_graphs",
    "register_graph",
    "sensitivity_depth",
    "spectral_gap",
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
_GRAPHS: dict[str, GraphFn] = {}


def register_graph(name: str) -> Callable[[GraphFn], GraphFn]:
    """Register ``fn(in_features, out_features, degree, blocks, seed) -> index[G, D]``."""

    def deco(fn: GraphFn) -> GraphFn:
        if name in _GRAPHS:
            raise ValueError(f"graph construction {name!r} is already registered")
        _GRAPHS[name] = fn
        return fn

    return deco


def list_graphs() -> list[str]:
    """Names of the registered constructions."""
    return sorted(_GRAPHS)


def _generator(seed: int) -> torch.Generator:
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


def choose_blocks(
    in_features: int, out_features: int, degree: int, mixing: int, graph: str = "random"
) -> int:
    """Block count G for a degree and a mixing k: G = k * C_in / D, adjusted to divide C_out.

    When the target does not divide ``out_features`` the nearest divisor is taken (ties go
    to the larger, which mixes more) and a warning says so.
    """
    if graph == "exact":
        return out_features
    if graph == "grouped":
        mixing = 1
    if graph == "paired":
        mixing = 2
    if int(mixing) != mixing or mixing < 1:
        raise ValueError(f"mixing must be a positive integer, got {mixing}; use mixing >= 1")
    target = mixing * in_features / degree
    candidates = _divisors(out_features)
    if graph == "cayley":
        candidates = [d for d in candidates if d & (d - 1) == 0 and d <= in_features]
    best = min(candidates, key=lambda d: (abs(math.log(d / target)), -d))
    if best != target:
        warnings.warn(
            f"{in_features}->{out_features} with degree {degree}, mixing {mixing}: "
            f"{target:g} blocks do not divide {out_features} outputs; using {best} blocks "
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
    if construction not in _GRAPHS:
        raise ValueError(f"unknown graph {construction!r}; choose one of {', '.join(list_graphs())}")
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
    index = _GRAPHS[construction](in_features, out_features, degree, blocks, seed)
    index = index.to(torch.int64).contiguous()
    assert index.shape == (blocks, degree), (construction, index.shape)
    return BipartiteGraph(
        in_features, out_features, degree, blocks, index, construction,
        None if construction in ("cayley", "grouped") else int(seed),
    )


@register_graph("random")
def _random(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """Balanced: slots filled from concatenated seeded permutations of the inputs.

    Every input is read ``G*D // C_in`` or one more times. Where a block straddles two
    permutations, the next permutation is reordered (stably) so that its first entries
    avoid the inputs the block already has; the balance is unchanged.
    """
    gen = _generator(seed)
    rows: list[list[int]] = []
    perm: list[int] = []
    pos = 0
    for _ in range(blocks):
        row: list[int] = []
        while len(row) < degree:
            if pos == len(perm):
                perm = torch.randperm(in_features, generator=gen).tolist()
                pos = 0
                if row:  # straddling block: move a clash-free prefix to the front
                    taken = set(row)
                    need = degree - len(row)
                    fresh = [c for c in perm if c not in taken][:need]
                    chosen = set(fresh)
                    perm = fresh + [c for c in perm if c not in chosen]
            take = min(degree - len(row), len(perm) - pos)
            row.extend(perm[pos:pos + take])
            pos += take
        rows.append(sorted(row))  # a block's inputs are a set; sorted reads memory in order
    return torch.tensor(rows, dtype=torch.int64)


@register_graph("grouped")
def _grouped(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """Contiguous blocks, no mixing: the grouped-convolution baseline."""
    if blocks * degree != in_features:
        raise ValueError(
            f"grouped graph needs blocks * degree == in_features, got {blocks}*{degree} != "
            f"{in_features}; pick a compression that divides {in_features}"
        )
    return torch.arange(in_features, dtype=torch.int64).reshape(blocks, degree)


@register_graph("paired")
def _paired(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """k = 2 as a natural and one permuted copy: block g reads its own contiguous input chunk
    ``g*D/2 .. (g+1)*D/2 - 1`` and ``D/2`` inputs of one seeded permutation (none of its own).

    Every input is read by exactly two blocks, as ``random`` with mixing 2, but an export can
    run the layer as ``Conv(x, group=G) + Conv(Gather(x, perm), group=G)``: one gathered copy
    of the input (C_in channels) instead of two (2*C_in), and the first conv reads ``x`` in
    whatever layout the runtime keeps it. Rows are ``[natural half, permuted half]`` in that
    order (the export reads the split from the index). Needs ``G * D == 2 * C_in`` with D even
    (G dividing C_in); where the sizes do not allow it, the layer is drawn like ``random``.
    """
    half = degree // 2
    if degree % 2 or blocks * half != in_features:
        return _random(in_features, out_features, degree, blocks, seed)
    gen = _generator(seed)
    own = torch.arange(in_features).view(blocks, half)
    perm = torch.randperm(in_features, generator=gen)
    if blocks > 1:
        # move every input that landed in its own block's chunk by swapping with a slot of
        # another block whose input is foreign to both blocks (always exists for blocks >= 2,
        # as each swap only ever fixes clashes), so a block never reads an input twice
        chunk = perm.view(blocks, half)
        for _ in range(4 * in_features):
            clash = (chunk // half) == torch.arange(blocks).view(-1, 1)
            if not bool(clash.any()):
                break
            g, s = (int(v) for v in clash.nonzero()[0])
            for h in torch.randperm(blocks * half, generator=gen).tolist():
                g2, s2 = divmod(h, half)
                a, b = int(chunk[g, s]), int(chunk[g2, s2])
                if g2 != g and b // half != g and a // half != g2:
                    chunk[g, s], chunk[g2, s2] = b, a
                    break
        perm = chunk.reshape(-1)
    rows = torch.cat([own, perm.view(blocks, half).sort(dim=1).values], dim=1)
    return rows


@register_graph("exact")
def _exact(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """The paper's layer: every block (G = C_out: every output) its own random D-subset.

    Drawn like ``random`` so that every input is read (as balanced as the sizes allow).
    """
    return _random(in_features, out_features, degree, blocks, seed)


# ---------------------------------------------------------------------------- cayley


def _hadamard(m: int) -> np.ndarray:
    """``[2^m, 2^m]`` character table of {0,1}^m: H[a, x] = (-1)^<a, x>."""
    idx = np.arange(1 << m)
    parity = np.zeros((1 << m, 1 << m), dtype=np.int64)
    for bit in range(m):
        parity ^= ((idx[:, None] >> bit) & 1) & ((idx[None, :] >> bit) & 1)
    return 1 - 2 * parity


def _log2_exact(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(
            f"the cayley graph needs power-of-two sizes, but {what} is {n}; "
            f"use graph='random' for these sizes"
        )
    return n.bit_length() - 1


def _cayley_generators(m: int, tops: int, per_top: int) -> np.ndarray:
    """Deterministic generator lows ``L[t, j]`` in {0,1}^m (see :func:`_cayley`).

    Greedy small-bias rule: elements are added one at a time, each time the candidate that
    minimises the largest non-trivial value of ``mu_a = sum_t (sum_{l in L_t} (-1)^<a,l>)^2``
    (ties: the smaller sum of ``mu_a^2``, then the smaller integer). Candidates are all of {0,1}^m up to m = 8, else a fixed
    stride-walk of 256 elements, so the rule stays explicit and fast.
    """
    size = 1 << m
    had = _hadamard(m).astype(np.int64) if m <= 11 else None
    if had is None:
        raise ValueError("cayley graphs are supported up to 2048 blocks; use graph='random'")
    lam = np.zeros((tops, size), dtype=np.int64)  # lam[t, a]
    mu = np.zeros(size, dtype=np.int64)
    chosen = np.zeros((tops, per_top), dtype=np.int64)
    used = [set() for _ in range(tops)]
    step = 0
    for j in range(per_top):
        for t in range(tops):
            if m <= 8:
                cand = np.arange(size)
            else:  # odd stride walks {0..size-1}: a fixed, spread-out candidate list
                cand = (np.arange(256) * 0x9E5 + step * 257) % size
            cand = np.array([c for c in cand if c not in used[t]], dtype=np.int64)
            if cand.size == 0:
                cand = np.array([c for c in range(size) if c not in used[t]], dtype=np.int64)
            # new mu_a if c is added to L_t: mu_a + 2 lam[t,a] H[a,c] + 1
            new = mu[:, None] + 2 * lam[t][:, None] * had[:, cand] + 1
            rest = new[1:] if size > 1 else np.zeros((1, cand.size), dtype=np.int64)
            # lexicographic: smallest worst character, then least energy, then smallest c
            best = np.lexsort((cand, (rest.astype(np.float64) ** 2).sum(axis=0), rest.max(axis=0)))[0]
            c = int(cand[best])
            chosen[t, j] = c
            used[t].add(c)
            mu += 2 * lam[t] * had[:, c] + 1
            lam[t] += had[:, c]
            step += 1
    return chosen


@register_graph("cayley")
def _cayley(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """Seed-free Cayley graph of {0,1}^n under XOR (n = log2 C_in).

    Blocks are labelled by the subgroup S = {0..G-1} of {0,1}^n (G = 2^m <= C_in). Block
    b reads {b XOR h : h in H}. H holds ``k = G*D/C_in`` elements in every coset of S
    (t * G + l for l in L_t, t < C_in / G), so each input is read by exactly k blocks and
    no block repeats an input. The L_t come from :func:`_cayley_generators`.
    """
    n = _log2_exact(in_features, "in_features")
    m = _log2_exact(blocks, "blocks")
    if m > n:
        raise ValueError(f"cayley needs blocks <= in_features, got {blocks} > {in_features}")
    tops = in_features // blocks
    if degree % tops:
        raise ValueError(
            f"cayley with {blocks} blocks over {in_features} inputs needs a degree that is a "
            f"multiple of {tops}, got {degree}; use a power-of-two compression"
        )
    lows = _cayley_generators(m, tops, degree // tops)
    h = (np.arange(tops)[:, None] * blocks + lows).reshape(-1)  # generator set H
    b = np.arange(blocks)[:, None]
    return torch.from_numpy(np.sort(b ^ h[None, :], axis=1).astype(np.int64))


def cayley_spectrum(graph: BipartiteGraph) -> np.ndarray:
    """Closed-form squared singular values of a cayley graph's biadjacency, from characters.

    With blocks = S = {0,1}^m inside {0,1}^n, ``B B^T[b, c] = #{h, h' in H: h ^ h' = b ^ c}``
    is a Cayley matrix on S, so its eigenvalues are ``mu_a = sum_t (sum_{l in L_t} (-1)^<a,l>)^2``
    for the characters a of S; returned unsorted, indexed by a.
    """
    if graph.construction != "cayley":
        raise ValueError("cayley_spectrum needs a graph built with construction='cayley'")
    blocks, tops = graph.blocks, graph.in_features // graph.blocks
    m = blocks.bit_length() - 1
    h = graph.index[0].numpy()  # block 0 reads H itself
    lows = np.zeros((tops, graph.degree // tops), dtype=np.int64)
    fill = [0] * tops
    for x in h:
        t, low = int(x) // blocks, int(x) % blocks
        lows[t, fill[t]] = low
        fill[t] += 1
    had = _hadamard(m)
    lam = had[:, lows].sum(axis=2)  # [a, t]
    return (lam.astype(np.float64) ** 2).sum(axis=1)


# --------------------------------------------------------------------------- analysis


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
