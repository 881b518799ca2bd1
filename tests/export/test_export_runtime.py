"""export --runtime openvino: auto tunes in OpenVINO, the file runs there with torch's outputs.

OpenVINO runs in a spawned child process: its worker threads, once loaded, make a later
``os.kill(os.getpid(), SIGTERM)`` in the same process (tests/_util/test_io.py) crash with SIGSEGV.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xsurgery import XConv2d
from xsurgery.errors import UserError

pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

from xsurgery.export import export_onnx, read_metadata  # noqa: E402
from xsurgery.export._ov import session as ov_session  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        XConv2d(16, 32, 1, compress=2, graph="paired", seed=1), nn.BatchNorm2d(32), nn.ReLU(),
        XConv2d(32, 32, 3, padding=1, compress=4, seed=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()


def isolated(fn, *args):
    """``fn(*args)`` in a fresh spawned process; its exceptions (assertions) re-raised here."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


@pytest.mark.parametrize("layout", ["gather", "auto"])
def test_openvino_runtime_verifies_and_records_itself(tmp_path, layout):
    isolated(_check_openvino_export, tmp_path, layout)


def _check_openvino_export(tmp_path, layout):
    model = _model()
    res = export_onnx(model, tmp_path / "m.onnx", input_size=(16, 8, 8), layout=layout, runtime="openvino",
                      threads=1, verbose=False)
    assert res.runtime == "openvino" and res.max_rel_err < 1e-4
    assert read_metadata(tmp_path / "m.onnx")["runtime"] == "openvino"
    if layout == "auto":
        assert res.auto_pick in ("all-dense", "all-gather", "per-layer choices")
    # independently of the export's own check: OpenVINO (f32) on a new input against torch in float64
    x = torch.randn(3, 16, 8, 8)
    got = ov_session(str(tmp_path / "m.onnx"), 1, exact=True).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_default_runtime_is_onnxruntime_and_unknown_runtime_is_refused(tmp_path):
    res = export_onnx(_model(), tmp_path / "m.onnx", input_size=(16, 8, 8), layout="gather", threads=1, verbose=False)
    assert res.runtime == "onnxruntime" and read_metadata(tmp_path / "m.onnx")["runtime"] == "onnxruntime"
    with pytest.raises(UserError, match="runtime"):
        export_onnx(_model(), tmp_path / "n.onnx", input_size=(16, 8, 8), runtime="tensorrt", verbose=False)
    assert not (tmp_path / "n.onnx").exists()


def test_cli_runtime_openvino(tmp_path):
    isolated(_check_cli, tmp_path)


def _check_cli(tmp_path):
    import contextlib
    import io
    import json

    from xsurgery.checkpoint import save
    from xsurgery.cli import main
    from xsurgery.surgery import convert

    model, _ = convert("resnet18", compress=4, graph="paired", input_size=(32, 32), check=False)
    save(model, str(tmp_path / "m.xs"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", str(tmp_path / "m.xs"), "-o", str(tmp_path / "m.onnx"), "--input-size", "32", "32",
                   "--layout", "gather", "--runtime", "openvino", "--threads", "1", "--json"])
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert out["runtime"] == "openvino" and out["max_rel_err"] < 1e-4
