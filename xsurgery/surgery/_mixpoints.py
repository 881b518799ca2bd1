"""Where a model mixes its channels across blocks (``mix_points``).

Reach through a chain of converted layers needs mixing between grouped blocks, not at every
layer. With ``mix_points="chain"`` the layer reading the widest input of each
chain of converted layers (joined by per-channel ops: norms, activations, pools, depthwise
convs) becomes a grouped layer with the same degree (contiguous blocks, G = C_in / D: no
Gather in its export), and so does a single layer running in parallel with such a chain (same
input, outputs summed: ResNet's downsample), since the chain mixes that path. The other
layers keep their graph (mixing k; any expander construction: ``random``, ``paired``, ``auto``). ``"every"`` - the rule before, and of every
checkpoint saved without the field - keeps the graph at every layer. ``"auto"`` (the default)
is ``chain`` for the layers with mixing 1 (the default: a permutation is all they mix with)
and ``every`` for the others, each of which is an expander on its own (an early 3-epoch
Fashion-MNIST run had ``chain`` at mixing 2 cost the small ResNet 0.55 points).

Same degree, parameters and MACs; the report shows the grouped layers (spectral gap 0) and
tests check the reach through the network (``tests/test_mixpoints.py``). On ONNX Runtime it
removes the Gather and the two layout reorders around the widest third of ResNet-50's layers
(``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..graphs import build_graph, graph_construction
from ._fx import Trace

__all__ = ["place_mix_points"]



def place_mix_points(decisions: Sequence, trace: Trace, mode: str) -> None:
    """Make the layers whose path mixes elsewhere grouped (decisions changed in place, with a note)."""
    if mode == "every" or not trace.ok:
        return
    by = {d.name: d for d in decisions if d.converted and graph_construction(d.graph).expander and d.in_channels % d.degree == 0
          and d.out_channels % (d.in_channels // d.degree) == 0 and (mode == "chain" or d.mixing == 1)}
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
        g = build_graph(d.in_channels, d.out_channels, d.degree, d.in_channels // d.degree, construction="grouped")
        keep = [n for n in chain if n not in drop]
        d.blocks, d.mixing, d.graph, d.seed, d._graph = g.blocks, g.mixing, g.construction, None, g
        note = f"grouped (mix points 'chain': {', '.join(keep)} mix{'es' if len(keep) == 1 else ''} this path)"
        d.note = f"{d.note}; {note}" if d.note else note
