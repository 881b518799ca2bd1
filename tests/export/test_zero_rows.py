"""Layers that see 0 rows (a detection head with no proposals): export and the report's note."""

import io
import warnings

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from xsurgery.surgery import convert


class Head(nn.Module):
    """Rows whose first input is positive go through a head of Linears (none, on a negative input)."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.cls = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        r = torch.relu(self.stem(x))[x[:, 0] > 0]
        return self.cls(torch.relu(self.b(torch.relu(self.a(r)))))


def test_gather_form_exports_at_zero_rows_and_computes_at_many(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    torch.manual_seed(0)
    empty = -torch.rand(4, 16)  # no row passes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv, rep = convert(Head(), example_inputs=empty)
        rows = {r.name: r for r in rep.layers}
        assert rows["a"].converted and rows["a"].macs_before == 0
        assert "0 rows" in rows["a"].note  # the report says what it counted on
        buf = io.StringIO()
        rep.render(Console(file=buf, width=400))
        summary = " ".join(buf.getvalue().split())
        assert "MACs depend on the input's values: counted on the example (x [4, 16]), on which 3 layers ran on " \
            "0 rows" in summary and "more rows: a, b, cls" in summary
        res = export_onnx(conv, str(tmp_path / "h.onnx"), example_inputs=empty, layout="gather", verbose=False)
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    x = torch.randn(6, 16)
    x[:, 0] = torch.tensor([1.0, 0.5, 2.0, -1.0, -0.5, -2.0])  # now 3 rows reach the head
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = conv(x).numpy()
    assert got.shape == want.shape == (3, 4)
    assert np.allclose(got, want, atol=1e-5)


def test_rows_that_depend_on_values_export_a_form_that_runs_at_zero_rows(tmp_path):
    """Traced with rows present, the head's layers still run when a later input brings none."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from xsurgery.export import export_onnx

    torch.manual_seed(0)
    x = torch.randn(6, 16)
    x[:, 0] = torch.tensor([1.0, 0.5, 2.0, -1.0, -0.5, -2.0])  # 3 rows reach the head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv, _ = convert(Head(), example_inputs=x)
        res = export_onnx(conv, str(tmp_path / "h.onnx"), example_inputs=x, layout="gather", verbose=False)
    ops = [n.op_type for n in onnx.load(res.path).graph.node]
    assert "Conv" not in ops and "MatMul" in ops  # the head's XLinears: batched MatMuls, no grouped Conv
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (got,) = sess.run(None, {name: x.numpy()})
    with torch.no_grad():
        want = conv(x).numpy()
    assert got.shape == want.shape == (3, 4) and np.allclose(got, want, atol=1e-5)
    (none,) = sess.run(None, {name: -np.abs(x.numpy())})  # no row passes
    assert none.shape == (0, 4)
    # a layer whose rows do not depend on the values keeps the grouped-Conv form
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    conv, _ = convert(m, example_inputs=x)
    res = export_onnx(conv, str(tmp_path / "m.onnx"), example_inputs=x, layout="gather", verbose=False)
    assert "Conv" in [n.op_type for n in onnx.load(res.path).graph.node]
