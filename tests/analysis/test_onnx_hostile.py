"""Issue 23: ``xsurgery report FILE.onnx`` on hostile files: linear in the node count, one
line for metadata of the wrong types, escaped metadata, no file outside the folder read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from xsurgery.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(path, n_nodes=2, meta=None, external=False, index=None):
    import numpy as np

    nodes, prev = [], "x"
    for i in range(n_nodes):
        nodes.append(helper.make_node("Relu", [prev], [f"t{i}"], name=f"/blk{i}/Relu"))
        prev = f"t{i}"
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    if external:  # data "stored" outside the folder: never to be read
        weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "../../../../etc/shadow"), ("offset", "0"), ("length", "64")):
            e = weight.external_data.add()
            e.key, e.value = k, v
    inits = [weight]
    if index is not None:
        inits.append(numpy_helper.from_array(np.asarray(index, np.int64), "head.index"))
    nodes.append(helper.make_node("MatMul", [prev, "W"], ["y"], name="/head/MatMul"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (meta or {}).items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return str(path)


def _report(path, capsys, *extra):
    capsys.readouterr()
    code = main(["report", path, *extra])
    return code, capsys.readouterr()


def test_report_is_linear_in_the_node_count(tmp_path):
    """60k nodes, 6k X-layers named in the metadata (2.7 MB): the old owner look-up (every node
    against every layer) took minutes; a dictionary look-up per scope level takes seconds."""
    layers = [{"name": f"zz{i}", "degree": 1, "in": 4, "out": 4} for i in range(6000)]
    path = _model(tmp_path / "big.onnx", 60_000, {"xsurgery.layers": json.dumps(layers)})
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "xsurgery.cli", "report", path, "--json", "-"], env=env,
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(json.loads(res.stdout)["layers"]) >= 6000


@pytest.mark.parametrize("key,value", [
    ("xsurgery.layers", '{"a": 1}'),
    ("xsurgery.layers", "[1, 2]"),
    ("xsurgery.layers", '[{"name": 5}]'),
    ("xsurgery.layers", '[{"name": "head", "degree": "two"}]'),
    ("xsurgery.layers", '[{"name": "head", "degree": -4}]'),
    ("xsurgery.layers", '[{"name": "head", "in": ' + "9" * 5000 + "}]"),
    ("xsurgery.layers", '[{"name": "head", "graph": 7}]'),
    ("xsurgery.layers", "[" * 100_000),
    ("xsurgery.input_shape", '"abc"'),
    ("xsurgery.input_shape", "5"),
])
def test_metadata_of_the_wrong_types_is_one_line(tmp_path, capsys, key, value):
    path = _model(tmp_path / "m.onnx", meta={key: value})
    code, out = _report(path, capsys)
    assert code == 2 and "Traceback" not in out.err
    assert out.err.count("\n") == 1 and out.err.startswith("xsurgery: error:") and "re-export" in out.err


@pytest.mark.parametrize("index", [[10_000, 1, 2, 3], [-1, 1, 2, 3], [0, 0, 0, 0], [1, 2]])
def test_out_of_range_or_negative_indices_are_reported_without_a_graph(tmp_path, capsys, index):
    meta = {"xsurgery.layers": json.dumps([{"name": "head", "degree": 2, "in": 4, "out": 4, "blocks": 2}])}
    path = _model(tmp_path / "i.onnx", meta=meta, index=index)
    code, out = _report(path, capsys, "--json", "-")
    assert code == 0, out.err
    row = next(r for r in json.loads(out.out)["layers"] if r["name"] == "head")
    assert row["spectral_gap"] is None


def test_metadata_is_escaped_on_the_terminal(tmp_path, capsys):
    evil = "resnet\nxsurgery: error: spoofed\x1b[2J\x07"
    meta = {"xsurgery.source_model": evil, "xsurgery.layout": "gather\r\x1b[31m",
            "xsurgery.layers": json.dumps([{"name": "head\n\x1b[1mX", "degree": 2, "in": 4, "out": 4}])}
    path = _model(tmp_path / "e.onnx", meta=meta)
    for fmt in ("table", "markdown", "csv"):
        code, out = _report(path, capsys, "--format", fmt)
        assert code == 0, out.err
        text = out.out + out.err
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text, fmt
        assert not any(line.startswith("xsurgery: error: spoofed") for line in text.splitlines()), fmt


def test_external_data_outside_the_folder_is_never_read(tmp_path, capsys, monkeypatch):
    import builtins

    path = _model(tmp_path / "x.onnx", external=True)
    opened = []
    real = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    code, out = _report(path, capsys)
    assert code == 0 and "Traceback" not in out.err, out.err
    assert not [f for f in opened if "shadow" in f]
