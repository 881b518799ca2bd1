"""ONNX export: each X-layer as Gather + grouped Conv (or grouped MatMul), verified in ONNX Runtime.

Per X-layer the file holds one of its forms:

* ``gather``: ``Gather(axis=1, index)`` + ``Conv(group=G)`` with the compact weight. XLinear:
  ``Reshape``/``Transpose`` to ``[1, C_in, M]``, ``Gather(axis=1)`` on the feature axis and a
  grouped 1x1 ``Conv`` (G matmuls of the compact weight), back to ``[..., C_out]``. The
  Gather is left out when the layer's index is the identity. A conv whose index is a natural
  and one permuted copy (``graph="paired"``) is ``Conv(x, group=G) + Conv(Gather(x, perm),
  group=G)`` instead: the same math with C_in gathered channels instead of 2 * C_in.
* ``matmul`` (XLinear only): the same Gather on ``[C_in, M]`` rows and one batched ``MatMul``
  ``[G, O/G, D] x [G, D, M]`` over the blocks instead of the grouped Conv.
* ``dense``: a plain ``Conv`` / ``Gemm`` / ``MatMul`` with the zero-filled dense weight (widest
  support; the fastest where blocks are few or tiny).

Which gather form an X-layer class gets is one entry of a registry keyed by the class
(``_forms.register_form``).

``layout="auto"`` times every form of every X-layer alone in the runtime (ONNX Runtime, or
OpenVINO with ``runtime="openvino"``; both are entries of :mod:`xsurgery.export.runtimes`,
the registry ``xsurgery bench`` times in too) at the layer's real input shape and the export batch
(the fastest of at least 10 interleaved runs) for a per-layer mix (the fastest sparse form where at least 5 %
faster than dense); then it times the whole model as all-dense, all-gather, all-matmul (where
a model has XLinear layers) and that mix, with the
session options ``xsurgery bench`` uses (thread spinning off, the given threads), in
interleaved rounds until the pick repeats, and keeps a gather form only when it beats
all-dense by 5 % in 75 % of the paired rounds (the fastest uniform candidate when within 3 % of the fastest: it
does not depend on per-layer noise, so it repeats). Within noise, the file is all-dense.

The graph is produced by the TorchScript exporter (``torch.onnx.export(dynamo=False)``): the
gather execution already is ``index_select`` + ``conv2d(groups=G)``, which it maps to
Gather + Conv(group). On torch 2.14 it is 10-20x faster than the dynamo exporter and keeps a
dynamic batch axis from a batch-1 example (the dynamo exporter specialises batch 1).

``quantize="int8"`` then quantizes the verified float file (static QDQ through ONNX Runtime's
quantizer, calibrated on given batches or random inputs) and writes the int8 file, compared
with the float one (:mod:`xsurgery.export._quantize`).
"""

from __future__ import annotations

from ._export import DEFAULT_OPSET, LAYOUTS, MAX_OPSET, ExportResult, export_onnx
from ._meta import read_metadata
from ._quantize import GATHER_CHOICES, INT8_RTOL, MAX_TOP1_DROP, QUANTIZE
from .runtimes import RUNTIMES, Runtime, get_runtime, list_runtimes, register_runtime, unregister_runtime

__all__ = ["DEFAULT_OPSET", "GATHER_CHOICES", "INT8_RTOL", "LAYOUTS", "MAX_OPSET", "MAX_TOP1_DROP", "QUANTIZE",
           "RUNTIMES", "ExportResult", "Runtime", "export_onnx",
           "get_runtime", "list_runtimes", "read_metadata", "register_runtime", "unregister_runtime"]
