"""Fold an eval-mode BatchNormalization into the two convs of a paired X-conv's export.

The paired form is ``Conv(x, W_own) + Conv(Gather(x, perm), W_perm)`` (``_forms``). The
exporter folds a BatchNorm into the Conv right before it, but here an ``Add`` sits between
them, so the file kept ``Conv, Gather, Conv, Add, BatchNormalization``: one more pass over the
activations at run time, and BN parameters the report counted as weights. Since
``BN(a + b) = s * a + s * b + (beta - s * mean)`` with ``s = gamma / sqrt(var + eps)``, the
scale goes into both weights and the shift into the first conv's bias, and the BN node goes.

Only the exact pattern is rewritten: both convs read initializer weights used nowhere else,
feed only the ``Add``, which feeds only the BN, whose parameters are initializers. Anything
else is left as the exporter wrote it. The export's verification against torch runs after.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

__all__ = ["fold_add_batchnorm"]


def _consumers(graph: Any) -> Counter:
    uses: Counter = Counter()
    for node in graph.node:
        uses.update(i for i in node.input if i)
    uses.update(o.name for o in graph.output)
    return uses


def fold_add_batchnorm(proto: Any) -> int:
    """Rewrite every ``Conv + Conv -> Add -> BatchNormalization`` of ``proto`` in place; returns
    how many were folded."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = _consumers(graph)
    alias = {n.output[0]: n.input[0] for n in graph.node  # the exporter's de-duplicated constants
             if n.op_type == "Identity" and len(n.input) == 1 and n.input[0] in inits}
    inits.update({a: inits[src] for a, src in alias.items()})
    folded, drop = 0, []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        add = producer.get(bn.input[0])
        if add is None or add.op_type != "Add" or uses[add.output[0]] != 1 or any(i not in inits for i in bn.input[1:]):
            continue
        convs = [producer.get(i) for i in add.input]
        if len(convs) != 2 or any(c is None or c.op_type != "Conv" or uses[c.output[0]] != 1 for c in convs) \
                or convs[0] is convs[1]:
            continue
        if any(len(c.input) < 2 or c.input[1] not in inits or uses[c.input[1]] != 1
               or (len(c.input) > 2 and c.input[2] and (c.input[2] not in inits or uses[c.input[2]] != 1))
               for c in convs):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        if any(inits[c.input[1]].dims[0] != scale.shape[0] for c in convs):
            continue
        for k, conv in enumerate(convs):
            w = numpy_helper.to_array(inits[conv.input[1]])
            shape = (-1,) + (1,) * (w.ndim - 1)
            inits[conv.input[1]].CopyFrom(numpy_helper.from_array(
                (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype), conv.input[1]))
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else 0.0
            b = b * scale + ((beta - mean * scale) if k == 0 else 0.0)
            if k == 1 and not has_bias:
                continue
            b = np.broadcast_to(b, scale.shape).astype(w.dtype)
            if has_bias:
                inits[conv.input[2]].CopyFrom(numpy_helper.from_array(b, conv.input[2]))
            else:
                name = f"{bn.output[0]}.folded_bias"
                graph.initializer.append(numpy_helper.from_array(b, name))
                while len(conv.input) < 3:
                    conv.input.append("")
                conv.input[2] = name
        add.output[0] = bn.output[0]
        drop.append(bn)
        folded += 1
    for bn in drop:
        graph.node.remove(bn)
    used = {i for n in graph.node for i in n.input}
    gone = {alias.get(i, i) for b in drop for i in b.input[1:]} | {i for b in drop for i in b.input[1:]}
    for n in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in gone and n.output[0] not in used]:
        graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used and t.name in gone]:
        graph.initializer.remove(t)
    return folded
