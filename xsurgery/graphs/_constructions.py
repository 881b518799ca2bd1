"""The registered constructions: ``random``, ``grouped``, ``paired``, ``exact`` and ``cayley``,
and the default ``auto`` (``paired`` where a layer mixes 2, else ``random``). Each is a pure
function of (sizes, degree, blocks, seed) with its own generator, and declares its constraints
where it is registered (:func:`register_graph`)."""

from __future__ import annotations

import numpy as np
import torch

from ._core import BipartiteGraph, generator, register_graph, register_graph_chooser

__all__ = ["cayley_spectrum"]


@register_graph("random", expander=True)
def _random(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """Balanced: slots filled from concatenated seeded permutations of the inputs.

    Every input is read ``G*D // C_in`` or one more times. Where a block straddles two
    permutations, the next permutation is reordered (stably) so that its first entries
    avoid the inputs the block already has; the balance is unchanged.
    """
    gen = generator(seed)
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


@register_graph_chooser("auto")
def _auto(in_features: int, out_features: int, degree: int, blocks: int) -> str:
    """The default: paired where the layer mixes 2 (G * D = 2 * C_in, D even), random elsewhere.

    Chosen by the Fashion-MNIST frontier (docs/results/frontier.md): at C = 4 the paired layer
    had the smallest mean gap to the accuracy-latency front over the three nets, and its export
    gathers one copy of the input instead of two.
    """
    return "paired" if degree % 2 == 0 and blocks * (degree // 2) == in_features else "random"


@register_graph("grouped", mixing=1, seeded=False)
def _grouped(in_features: int, out_features: int, degree: int, blocks: int, seed: int) -> torch.Tensor:
    """Contiguous blocks, no mixing: the grouped-convolution baseline."""
    if blocks * degree != in_features:
        raise ValueError(
            f"grouped graph needs blocks * degree == in_features, got {blocks}*{degree} != "
            f"{in_features}; pick a compression that divides {in_features}"
        )
    return torch.arange(in_features, dtype=torch.int64).reshape(blocks, degree)


@register_graph("paired", mixing=2, expander=True)
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
    gen = generator(seed)
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


@register_graph("exact", one_block_per_output=True)
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


@register_graph("cayley", power_of_two_blocks=True, seeded=False)
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


