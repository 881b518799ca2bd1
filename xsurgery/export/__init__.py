"""ONNX export: each X-layer as Gather + grouped Conv (or grouped MatMul), verified in ONNX Runtime.

Per X-layer the file holds one of two forms:

* ``gather``: ``Gather(axis=1, index)`` + ``Conv(group=G)`` with the compact weight. XLinear:
  ``Reshape``/``Transpose`` to ``[1, C_in, M]``, ``Gather(axis=1)`` on the feature axis and a
  grouped 1x1 ``Conv`` (G matmuls of the compact weight), back to ``[..., C_out]``. The
  Gather is left out when the layer's index is the identity.
* ``dense``: a plain ``Conv`` / ``Gemm`` with the zero-filled dense weight (widest support).

``layout="auto"`` times both forms of every X-layer alone in ONNX Runtime on this machine
(same session options as the final model, the layer's real input shape at the export batch
size, interleaved runs, the fastest of at least 10) and keeps gather where it is at least 5 %
faster; then it times that mix against the all-dense and all-gather exports of the whole model
and keeps the fastest, so ``auto`` is never slower than either uniform layout as measured in
that run.

The graph is produced by the TorchScript exporter (``torch.onnx.export(dynamo=False)``): the
gather execution already is ``index_select`` + ``conv2d(groups=G)``, which it maps to
Gather + Conv(group). On torch 2.14 it is 10-20x faster than the dynamo exporter and keeps a
dynamic batch axis from a batch-1 example (the dynamo exporter specialises batch 1).
"""

from __future__ import annotations

from ._cli import add_cli
from ._export import DEFAULT_OPSET, LAYOUTS, MAX_OPSET, ExportResult, export_onnx
from ._meta import read_metadata

__all__ = ["DEFAULT_OPSET", "LAYOUTS", "MAX_OPSET", "ExportResult", "add_cli", "export_onnx", "read_metadata"]
