"""Where a model mixes its channels across blocks (``mix_points``).

Reach through a chain of converted layers (joined by per-channel ops: norms, activations,
pools, depthwise convs) needs mixing between grouped blocks, not at every layer. A layer
dropped from mixing becomes a grouped layer of the same degree (contiguous blocks,
G = C_in / D: no Gather in its export); so does a single layer running in parallel with a
chain (same input, outputs summed: ResNet's downsample), since the chain mixes that path.

- ``chain``: the layer reading the widest input of each chain is grouped; the others keep
  their graph (mixing k; any expander construction: ``random``, ``paired``, ``auto``).
- ``alternate``: every other layer of a chain keeps its graph: the widest is grouped, and so
  is every second layer from it. A chain of two (a basic residual block, MobileNet's
  expand/project pair) is as ``chain``; ResNet-50's bottleneck (1x1, 3x3, 1x1) permutes once,
  before its 3x3, instead of twice; a long chain of pointwise layers (a MobileNet-V1) mixes at
  half of them.
- ``every``: the graph at every layer (the rule of every checkpoint saved before the field).
- ``auto`` (the default): for layers with mixing 1 (a permutation is all they mix with)
  ``alternate`` (spec version 2; files saved at version 1 keep ``chain``), ``every`` for the others,
  each of which is an expander on its own (an early 3-epoch Fashion-MNIST run had ``chain``
  at mixing 2 cost the small ResNet 0.55 points).

Same degree, parameters and MACs; the report shows the grouped layers (spectral gap 0) and
tests check the reach through the network (``tests/surgery/test_mixpoints.py``). On ONNX Runtime each
dropped layer removes a Gather and the two layout reorders around it (``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..graphs import build_graph, graph_construction
from ._fx import Trace

__all__ = ["place_mix_points"]



def _widest(chain: list[str], by: dict) -> list[str]:
    return [max(chain, key=lambda n: by[n].in_channels)]  # ties: the first


def _alternate(chain: list[str], by: dict) -> list[str]:
    wide = chain.index(_widest(chain, by)[0])
    return [n for i, n in enumerate(chain) if (i - wide) % 2 == 0]


# mode -> the layers of a chain (of two or more) that are made grouped
_DROPS: dict[str, Callable[[list[str], dict], list[str]]] = {"chain": _widest, "alternate": _alternate}


def _auto_mode(version: int) -> str:
    """What ``mix_points="auto"`` is for mixing-1 layers under a spec ``version``."""
    return "chain" if version < 2 else "alternate"


def place_mix_points(decisions: Sequence, trace: Trace, mode: str, version: int) -> None:
    """Make the layers whose path mixes elsewhere grouped (decisions changed in place, with a note);
    ``version``: the surgery spec's, which decides what ``auto`` is."""
    if mode == "every" or not trace.ok:
        return
    rule = _auto_mode(version) if mode == "auto" else mode
    by = {d.name: d for d in decisions if d.converted and graph_construction(d.graph).expander and d.in_channels % d.degree == 0
          and d.out_channels % (d.in_channels // d.degree) == 0 and (mode != "auto" or d.mixing == 1)}
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
        drop.update(dict.fromkeys(_DROPS[rule](chain, by), chain))
    spans = {(trace.ends[c[0]][0], trace.ends[c[-1]][1]): c for c in long if c[0] in trace.ends and c[-1] in trace.ends}
    for chain in chains:
        if len(chain) == 1 and trace.ends.get(chain[0]) in spans:
            drop[chain[0]] = spans[trace.ends[chain[0]]]
    for name, chain in drop.items():
        d = by[name]
        g = build_graph(d.in_channels, d.out_channels, d.degree, d.in_channels // d.degree, construction="grouped")
        keep = [n for n in chain if n not in drop]
        d.blocks, d.mixing, d.graph, d.seed, d._graph = g.blocks, g.mixing, g.construction, None, g
        note = f"grouped (mix points '{rule}': {', '.join(keep)} mix{'es' if len(keep) == 1 else ''} this path)"
        d.note = f"{d.note}; {note}" if d.note else note
