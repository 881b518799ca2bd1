"""Where a mixing-1 model permutes its channels (``mix_points``).

A mixing-1 X-layer is a grouped conv behind a channel permutation. Reach through a chain of
such layers needs a permutation between grouped layers, not one at every layer: with
``mix_points="chain"`` the layer reading the widest input of each chain of converted layers
(joined by per-channel ops: norms, activations, pools, depthwise convs) keeps its blocks
contiguous, and so does a single layer that runs in parallel with such a chain (same input,
outputs summed, as ResNet's downsample), since the chain mixes that path. ``"every"`` (the
rule before, and of every checkpoint saved without the field) permutes at every layer.

On ONNX Runtime this removes the Gather and the two layout reorders around each such layer
(ResNet-50, C=4: the widest, stream-reading third of them; see ``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._fx import Trace
from .graphs import build_graph

__all__ = ["MIX_POINTS", "place_mix_points"]

MIX_POINTS = ("chain", "every")


def place_mix_points(decisions: Sequence, trace: Trace, mode: str) -> None:
    """Give the layers that need no permutation contiguous blocks (in place, with a note)."""
    if mode == "every" or not trace.ok:
        return
    by = {d.name: d for d in decisions
          if d.converted and d.mixing == 1 and d.graph == "random" and d.blocks * d.degree == d.in_channels}
    nxt = {a: b for a, b in trace.links.items() if a in by and b in by}
    targets = set(nxt.values())
    chains: list[list[str]] = []
    for name in by:
        if name in targets:
            continue
        chain = [name]
        while chain[-1] in nxt and nxt[chain[-1]] not in chain:
            chain.append(nxt[chain[-1]])
        chains.append(chain)
    long = [c for c in chains if len(c) >= 2]
    drop: dict[str, list[str]] = {}
    for chain in long:
        drop[max(chain, key=lambda n: by[n].in_channels)] = chain  # ties: the first
    spans = {(trace.ends[c[0]][0], trace.ends[c[-1]][1]): c for c in long if c[0] in trace.ends and c[-1] in trace.ends}
    for chain in chains:
        if len(chain) == 1 and trace.ends.get(chain[0]) in spans:
            drop[chain[0]] = spans[trace.ends[chain[0]]]
    for name, chain in drop.items():
        d = by[name]
        g = build_graph(d.in_channels, d.out_channels, d.degree, d.blocks, construction="grouped")
        keep = [n for n in chain if n not in drop]
        d.graph, d.seed, d._graph = g.construction, None, g
        note = f"no channel permutation (mix points 'chain': {', '.join(keep)} mix{'es' if len(keep) == 1 else ''} this path)"
        d.note = f"{d.note}; {note}" if d.note else note
