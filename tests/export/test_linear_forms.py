"""XLinear's three ONNX forms (grouped Conv, batched MatMul, dense) and auto's choice among them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from xsurgery import XConv2d, XLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from xsurgery.export import _forms, export_onnx, read_metadata  # noqa: E402
from xsurgery.export import _ort as xexport  # noqa: E402
from xsurgery.export._trace import _torch_export  # noqa: E402

pytestmark = pytest.mark.onnx


def _ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _numpy_reference(layer: XLinear, x: np.ndarray) -> np.ndarray:
    """The layer computed block by block in numpy from its compact weight and index."""
    w = layer.weight.detach().numpy()
    idx = layer.index.numpy().reshape(layer.blocks, layer.degree)
    per = layer.out_features // layer.blocks
    out = np.zeros((*x.shape[:-1], layer.out_features), dtype=np.float64)
    for g in range(layer.blocks):
        out[..., g * per:(g + 1) * per] = x[..., idx[g]].astype(np.float64) @ w[g * per:(g + 1) * per].T
    return out + layer.bias.detach().numpy()


def test_xlinear_has_gather_matmul_and_dense_forms_convs_two():
    assert _forms.forms_of(XLinear(8, 8, compress=2)) == ("gather", "matmul", "dense")
    assert _forms.forms_of(XConv2d(8, 8, 1, compress=2)) == ("gather", "dense")


@pytest.mark.parametrize("inner", [(5,), None, _forms.ANY_ROWS])
@pytest.mark.parametrize("form", ["gather", "matmul", "dense"])
def test_each_xlinear_form_matches_numpy_in_ort_at_another_batch(form, inner):
    torch.manual_seed(0)
    layer = XLinear(24, 16, compress=4, mixing=2).eval()  # G = 8 blocks of 2 outputs, D = 6
    assert layer.blocks == 8 and not layer._identity
    module = _forms._layer_form(layer, form, inner).eval()
    buf = io.BytesIO()
    _torch_export(module, torch.randn(2, 5, 24), buf, 18, dynamic=True, n_out=1)
    proto = onnx.load_from_string(buf.getvalue())
    ops = _ops(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    if form == "gather" and inner != _forms.ANY_ROWS:
        groups = [a.i for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
        assert groups == [8] and "MatMul" not in ops
    elif form != "dense":  # one batched MatMul over the blocks with the compact [G, O/G, D] weight
        assert "Conv" not in ops and ops.count("MatMul") == 1
        assert any(v.size == 16 * 6 for v in inits.values())
    if form == "dense":
        assert "Gather" not in ops and not any(v.size == 16 * 6 for v in inits.values())
    else:
        assert ops.count("Gather") >= 1
    x = np.random.default_rng(1).standard_normal((3, 5, 24)).astype(np.float32)  # batch 3: the dynamic axis
    np.testing.assert_allclose(_run(proto.SerializeToString(), x), _numpy_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_alternative_forms_register_after_gather_and_not_twice(monkeypatch):
    monkeypatch.setattr(_forms, "_FORMS", dict(_forms._FORMS))

    class XOther(nn.Module):
        pass

    with pytest.raises(ValueError, match="XOther needs a gather form before a 'fast' form"):
        _forms.register_form(XOther, form="fast")(lambda layer, inner=None: layer)
    with pytest.raises(ValueError, match="XLinear already has a 'matmul' form"):
        _forms.register_form(XLinear, form="matmul")(lambda layer, inner=None: layer)
    with pytest.raises(ValueError, match="XLinear already has a 'dense' form"):
        _forms.register_form(XLinear, form="dense")(lambda layer, inner=None: layer)
    with pytest.raises(ValueError, match="no export form 'fast'"):
        _forms._layer_form(XLinear(8, 8, compress=2), "fast")


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = XLinear(32, 32, compress=2, seed=1), XLinear(32, 8, compress=2, seed=2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _fake_clocks(monkeypatch, per_layer: list[list[float]], whole: list[float]) -> None:
    """Per layer: the min ms of each form in forms_of order; whole model: seconds per candidate."""
    it = iter(per_layer)
    monkeypatch.setattr(xexport, "_time_sessions", lambda s, f, *, stat="median", **kw: next(it))

    def rounds(sessions, feed, *, min_reps, samples=None, **kw):
        samples = samples if samples is not None else [[] for _ in sessions]
        assert len(sessions) == len(whole)
        for _ in range(min_reps):
            for i, t in enumerate(whole):
                samples[i].append(t)
        return samples

    monkeypatch.setattr(xexport, "_rounds", rounds)


@pytest.mark.parametrize("whole, pick, expect", [
    # [all-dense, all-gather, all-matmul, per-layer]: per layer fc1 matmul, fc2 gather
    ([3.0, 2.0, 1.9, 1.0], "per-layer choices", {"fc1": "matmul", "fc2": "gather"}),
    ([3.0, 2.0, 1.0, 1.0], "all-matmul", {"fc1": "matmul", "fc2": "matmul"}),  # uniform within noise
    ([1.0, 2.0, 2.0, 1.5], "all-dense", {"fc1": "dense", "fc2": "dense"}),  # nothing beats dense
])
def test_auto_chooses_among_the_three_forms(tmp_path, monkeypatch, whole, pick, expect):
    model = _Mlp().eval()
    _fake_clocks(monkeypatch, [[2.0, 1.0, 3.0], [1.0, 2.0, 3.0]], whole)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(1, 32), verbose=False, threads=1)
    assert res.layer_timings_ms == {"fc1": {"gather": 2.0, "matmul": 1.0, "dense": 3.0},
                                    "fc2": {"gather": 1.0, "matmul": 2.0, "dense": 3.0}}
    assert list(res.model_timings_ms) == ["all-dense", "all-gather", "all-matmul", "per-layer choices"]
    assert res.auto_pick == pick and res.layers == expect
    assert {r["name"]: r["layout"] for r in read_metadata(tmp_path / "m.onnx")["layers"]} == expect
    ops = _ops(onnx.load(tmp_path / "m.onnx"))
    assert ops.count("Conv") == list(expect.values()).count("gather")
    assert ops.count("Gather") == 2 - list(expect.values()).count("dense")
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run(open(tmp_path / "m.onnx", "rb").read(), x.numpy()), want, rtol=1e-4, atol=1e-5)


def test_auto_keeps_dense_for_a_layer_no_sparse_form_beats(tmp_path, monkeypatch):
    # fc1: matmul 0.97x dense (inside the 5% margin) -> dense; fc2: gather wins
    _fake_clocks(monkeypatch, [[1.0, 0.97, 1.0], [0.5, 0.9, 1.0]], [3.0, 2.0, 2.0, 1.0])
    res = export_onnx(_Mlp().eval(), tmp_path / "m.onnx", example_inputs=torch.randn(1, 32), verbose=False, threads=1)
    assert res.layers == {"fc1": "dense", "fc2": "gather"} and res.auto_pick == "per-layer choices"


def test_report_counts_a_matmul_file_like_a_gather_file(tmp_path):
    from xsurgery.analysis import onnx_report

    model = _Mlp().eval()
    x = torch.randn(1, 32)
    for form in ("gather", "matmul"):
        res = export_onnx(model, tmp_path / f"{form}.onnx", example_inputs=x, layout=form, verbose=False, threads=1)
        assert res.layers == {"fc1": form, "fc2": form}
    assert "Conv" not in _ops(onnx.load(tmp_path / "matmul.onnx"))
    reports = {form: onnx_report(str(tmp_path / f"{form}.onnx")).totals for form in ("gather", "matmul")}
    assert reports["matmul"]["macs_after"] == reports["gather"]["macs_after"] == 32 * 16 + 8 * 16
    assert reports["matmul"]["params_after"] == reports["gather"]["params_after"]


def test_matmul_layout_leaves_convs_in_their_gather_form(tmp_path):
    model = nn.Sequential(XConv2d(8, 8, 1, compress=2, graph="random"), nn.Flatten(1),  # one Gather + Conv
                          XLinear(8 * 4 * 4, 8, compress=2)).eval()
    res = export_onnx(model, tmp_path / "m.onnx", input_size=(8, 4, 4), layout="matmul", verbose=False, threads=1)
    assert res.layers == {"0": "gather", "2": "matmul"} and res.max_rel_err < 1e-4
    ops = _ops(onnx.load(tmp_path / "m.onnx"))
    assert ops.count("Conv") == 1 and ops.count("MatMul") == 1 and ops.count("Gather") == 2
