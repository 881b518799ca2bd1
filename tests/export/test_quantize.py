"""int8 export (``export_onnx(quantize="int8")`` / ``xsurgery export --quantize int8``): the file is
QDQ int8, runs in ORT within the stated tolerance of the torch model, keeps digits top-1 within
a point of float, the report reads its layout, and bad requests are refused in one line."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.errors import UserError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from xsurgery.analysis import onnx_report  # noqa: E402
from xsurgery.cli import main  # noqa: E402
from xsurgery.export import INT8_RTOL, export_onnx, read_metadata  # noqa: E402
from xsurgery.models.zoo import digits_cnn  # noqa: E402

pytestmark = pytest.mark.onnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "recipes", "digits.yaml")
TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "vocab_size": 50}


def _randomize_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine values of a trained net (not the init's 0/1), so folded biases differ."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model.eval()


def _cnn():
    torch.manual_seed(0)
    model, _ = xsurgery.convert(digits_cnn(width=8), compress=2, mixing=2, example_inputs=torch.randn(1, 1, 16, 16))
    return _randomize_bn(model), torch.randn(1, 1, 16, 16)


def _mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    model, _ = xsurgery.convert(mlp, compress=4, example_inputs=torch.randn(4, 40))
    return model.eval(), torch.randn(1, 40)


def _bert():
    pytest.importorskip("transformers")
    from xsurgery.models.hf import create_hf_model

    torch.manual_seed(0)
    ex = {"input_ids": torch.randint(0, 50, (1, 16)), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    model, _ = xsurgery.convert(create_hf_model("bert", TINY_BERT, False), compress=2, example_inputs=ex)
    return model.eval(), ex


def _feed(ex):
    if isinstance(ex, dict):
        return {k: v.numpy() for k, v in ex.items()}, ex
    return {"input": ex.numpy()}, ex


@pytest.mark.parametrize("build", [_cnn, _mlp, _bert], ids=["cnn", "mlp", "bert"])
def test_int8_export_verifies_runs_and_stays_close_to_torch(tmp_path, build, monkeypatch):
    model, ex = build()
    path = tmp_path / "m8.onnx"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.warns(UserWarning, match="random inputs"):
        res = export_onnx(model, str(path), example_inputs=ex, layout="gather", quantize="int8", verbose=False)
    # ORT's symbolic shape inference dumps sym_shape_infer_temp.onnx + <uuid>.data into the working
    # directory when it gives up (tiny BERT): nothing may land in the user's folder
    assert os.listdir(cwd) == []
    assert res.quantize == "int8" and res.int8["max_rel_err"] <= INT8_RTOL
    meta = read_metadata(str(path))
    assert meta["quantize"] == "int8" and json.loads(meta["int8"])["gather"] == res.int8["gather"]
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert int8_weights  # weights stored as int8
    # independently: the int8 file in ORT against the torch model, on a fresh batch
    gen = torch.Generator().manual_seed(7)
    if isinstance(ex, dict):
        x = {"input_ids": torch.randint(0, 50, (4, 16), generator=gen), "attention_mask": torch.ones(4, 16).long()}
        with torch.no_grad():
            ref = model(**x)[0].numpy()
    else:
        x = torch.randn((4, *ex.shape[1:]), generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
    feed, _ = _feed(x)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < rel <= INT8_RTOL  # quantized (not bit-equal to float), within the stated tolerance


def test_gather_float_or_int8_is_what_the_file_holds(tmp_path):
    model, ex = _cnn()
    for choice in ("float", "int8"):
        path = tmp_path / f"{choice}.onnx"
        with pytest.warns(UserWarning):
            res = export_onnx(model, str(path), example_inputs=ex, layout="gather", quantize="int8",
                              int8_gather=choice, verbose=False)
        assert res.int8["gather"] == choice
        proto = onnx.load(str(path))
        gathers = [n for n in proto.graph.node if n.op_type == "Gather"]
        assert len(gathers) == 3  # one per X-layer
        # DequantizeLinear -> Gather -> QuantizeLinear; int8: one scale on both sides (ORT drops the pair
        # and gathers the int8 tensor), float: the Gather's output re-quantized with its own range
        dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        q = {n.input[0]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        assert all(g.input[0] in dq and g.output[0] in q for g in gathers)
        assert all((dq[g.input[0]].input[1] == q[g.output[0]].input[1]) == (choice == "int8") for g in gathers)
    # auto times both and keeps one of them
    with pytest.warns(UserWarning):
        res = export_onnx(model, str(tmp_path / "auto.onnx"), example_inputs=ex, layout="gather", quantize="int8",
                          verbose=False)
    assert res.int8["gather"] in ("int8", "float") and set(res.int8["gather_timings_ms"]) == {"int8", "float"}


def test_report_shows_the_int8_layout(tmp_path):
    model, ex = _cnn()
    with pytest.warns(UserWarning):
        export_onnx(model, str(tmp_path / "m8.onnx"), example_inputs=ex, layout="gather", quantize="int8",
                    verbose=False)
    export_onnx(model, str(tmp_path / "m.onnx"), example_inputs=ex, layout="gather", verbose=False)
    q, f = onnx_report(str(tmp_path / "m8.onnx")), onnx_report(str(tmp_path / "m.onnx"))
    assert [r.precision for r in q.layers] == ["int8"] * 5 and all(r.precision is None for r in f.layers)
    assert [r.execution for r in q.layers if r.converted] == ["gather"] * 3
    # parameters: each conv/linear weight plus its (BN-folded) bias, counted from the torch model
    expected = sum(m.weight.numel() + m.weight.shape[0] for m in model.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear, xsurgery.XConv2d, xsurgery.XLinear)))
    assert q.params_after == f.params_after == expected
    assert [r.macs_after for r in q.layers] == [r.macs_after for r in f.layers]
    assert all(r.macs_after > 0 for r in q.layers)
    assert main(["report", str(tmp_path / "m8.onnx"), "--width", "0"]) == 0


def test_report_shows_dtype_column(tmp_path, capsys):
    model, ex = _mlp()
    with pytest.warns(UserWarning):
        export_onnx(model, str(tmp_path / "m8.onnx"), example_inputs=ex, quantize="int8", verbose=False)
    assert main(["report", str(tmp_path / "m8.onnx"), "--width", "0"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert "dtype" in header and out.count(" int8 ") >= 3


def _trained_digits():
    """A converted digits CNN trained for two epochs on the digits training split (~90 %+)."""
    from xsurgery.train.data import digits_tensors

    torch.manual_seed(0)
    model, _ = xsurgery.convert("digits_cnn", input_size=(1, 16, 16), model_kwargs={"width": 8})
    xtr, ytr, xte, yte = digits_tensors((1, 16, 16))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(2):
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), xte, yte


def test_digits_int8_top1_within_one_point_of_float(tmp_path, capsys):
    model, xte, yte = _trained_digits()
    with torch.no_grad():
        torch_top1 = 100 * (model(xte).argmax(1) == yte).float().mean().item()
    assert torch_top1 > 80
    ckpt = str(tmp_path / "digits.xs")
    xsurgery.save(model, ckpt)
    out, js = str(tmp_path / "d8.onnx"), str(tmp_path / "d8.json")
    assert main(["export", ckpt, "-o", out, "--quantize", "int8", "--calibration", DIGITS, "--layout", "gather",
                 "--json", js]) == 0
    rec = json.loads(open(js).read())["int8"]
    assert rec["calibration"] == "data" and rec["test_images"] == len(yte)
    assert rec["float_top1"] == pytest.approx(torch_top1, abs=100 / len(yte) + 1e-6)  # ORT float = torch
    assert abs(rec["int8_top1"] - rec["float_top1"]) <= 1.0
    # the int8 file itself, on the test split, independently of export's own count
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    int8_top1 = 100 * (sess.run(None, {"input": xte.numpy()})[0].argmax(1) == yte.numpy()).mean()
    assert int8_top1 == pytest.approx(rec["int8_top1"], abs=1e-3)  # the record rounds to 4 decimals
    assert main(["export", ckpt, "-o", out, "--quantize", "int8"]) == 2  # exists: no overwrite without --force
    assert "--force" in capsys.readouterr().err


def test_tolerance_failure_writes_nothing(tmp_path):
    model, ex = _mlp()
    path = tmp_path / "m8.onnx"
    with pytest.warns(UserWarning), pytest.raises(UserError, match="int8-rtol") as err:
        export_onnx(model, str(path), example_inputs=ex, quantize="int8", int8_rtol=1e-6, verbose=False)
    assert "\n" not in str(err.value) and not path.exists()
    assert not [p for p in os.listdir(tmp_path)]  # no temp files left


@pytest.mark.parametrize("extra, match", [
    (["--quantize", "int4"], "unknown --quantize 'int4'"),
    (["--quantize", "int8", "--calibration", "{ckpt}"], "takes a training recipe"),
    (["--quantize", "int8", "--calibration", "{yaml}"], "not a usable training recipe"),
    (["--quantize", "int8", "--calibration", "missing.yaml"], "not a usable training recipe"),
    (["--calibration", DIGITS], "add --quantize int8"),
    (["--quantize", "int8", "--benchmark"], "xsurgery bench"),
])
def test_refusals_are_one_line(tmp_path, capsys, extra, match):
    model, _ = xsurgery.convert("digits_cnn", input_size=(1, 16, 16), model_kwargs={"width": 8})
    ckpt = str(tmp_path / "d.xs")
    xsurgery.save(model, ckpt)
    (tmp_path / "plan.yaml").write_text("rules:\n  - {pattern: '*', compress: 2}\n")
    extra = [e.format(ckpt=ckpt, yaml=str(tmp_path / "plan.yaml")) for e in extra]
    assert main(["export", ckpt, "-o", str(tmp_path / "x.onnx"), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_bench_times_int8_variants(tmp_path):
    from xsurgery.bench import INT8_VARIANTS, bench

    torch.manual_seed(0)
    model = _randomize_bn(digits_cnn(width=8))
    result = bench(model, 2, input_size=(1, 16, 16), threads=1, backends=("ort",), quantize="int8",
                   ort_layout="fixed", repeat=1, warmup=0, min_sample_ms=0.1)
    assert result["quantize"] == "int8"
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == set(INT8_VARIANTS) and rows["dense"]["ratio_to_dense"] == 1.0
    assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in rows.values())
    assert "Gather" in rows["grouped"]["layout"] or rows["grouped"]["layout"] == "gather"
    with pytest.raises(UserError, match="drop the torch"):
        bench(model, 2, input_size=(1, 16, 16), backends=("torch", "ort"), quantize="int8")
    with pytest.raises(UserError, match="unknown --quantize"):
        bench(model, 2, input_size=(1, 16, 16), quantize="fp8")
