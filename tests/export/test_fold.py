"""The paired X-conv's export folds a following BatchNorm into both of its convs (``_fold``):
no BatchNormalization node is left, ORT matches torch, and the report counts the same weights
as the torch model; anything but the exact pattern is left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xsurgery import XConv2d

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from xsurgery.analysis import onnx_report  # noqa: E402
from xsurgery.export import export_onnx  # noqa: E402
from xsurgery.export._fold import fold_add_batchnorm  # noqa: E402

pytestmark = pytest.mark.onnx


def _bn(n: int, seed: int) -> nn.BatchNorm2d:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        bn.weight.copy_(torch.randn(n, generator=gen))
        bn.bias.copy_(torch.randn(n, generator=gen))
    return bn


def test_paired_conv_exports_with_its_batchnorm_folded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(XConv2d(16, 32, 3, padding=1, compress=4, mixing=2, bias=False), _bn(32, 1), nn.ReLU(),
                          XConv2d(32, 32, 1, compress=4, mixing=2, bias=True), _bn(32, 2)).eval()
    assert {m.graph_name for m in model.modules() if isinstance(m, XConv2d)} == {"paired"}
    path = tmp_path / "m.onnx"
    res = export_onnx(model, str(path), input_size=(16, 8, 8), layout="gather", verbose=False, threads=1)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Add") == 2 and ops.count("Gather") == 2
    assert res.max_rel_err < 1e-4
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the report counts each X-layer's compact weight and one bias (BN folded), as torch has them
    rep = onnx_report(str(path))
    want = sum(m.weight.numel() + m.out_channels for m in model.modules() if isinstance(m, XConv2d))
    assert rep.params_after == want


def _graph(consumers_of_add: int = 1, shared_weight: bool = False):
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 2, 1, 1)).astype(np.float32), rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    for name, v in (("g", rng.standard_normal(4)), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
                    ("v", 0.5 + rng.random(4))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]),
             helper.make_node("Conv", ["x", "w1" if shared_weight else "w2"], ["c2"]),
             helper.make_node("Add", ["c1", "c2"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y"], epsilon=1e-3)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])]
    if consumers_of_add > 1:
        nodes.append(helper.make_node("Relu", ["a"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 3, 3]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def test_fold_is_exact_and_only_for_the_pattern():
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 3)).astype(np.float32)
    proto = _graph()
    ref = _run(proto, x)
    # by hand: BN(conv1 + conv2) with numpy
    t = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    a = np.einsum("oi,nihw->nohw", (t["w1"] + t["w2"])[:, :, 0, 0], x)
    s = t["g"] / np.sqrt(t["v"] + 1e-3)
    want = s[None, :, None, None] * (a - t["m"][None, :, None, None]) + t["b"][None, :, None, None]
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
    assert fold_add_batchnorm(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Conv", "Add"]
    assert {i.name for i in proto.graph.initializer} == {"w1", "w2", "y.folded_bias"}
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_allclose(_run(proto, x), ref, rtol=1e-5, atol=1e-5)
    # the Add read by another node, or a weight shared by both convs: left as written
    for proto in (_graph(consumers_of_add=2), _graph(shared_weight=True)):
        before = proto.SerializeToString()
        assert fold_add_batchnorm(proto) == 0 and proto.SerializeToString() == before
