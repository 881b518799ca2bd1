"""xsurgery.bench and tools/bench_layers.py on tiny shapes: they run, and their JSON is complete and right.

No timing assertions: only structure, the dense reference (ratio 1) and the MACs ratios, which
are checked against MACs computed here by hand from the layer shapes.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from xsurgery import XConv2d, XLinear
from xsurgery.bench import BACKENDS, VARIANT_OPTIONS, VARIANTS, bench, count_macs
from xsurgery.cli._bench import add_cli
from xsurgery.errors import UserError
from xsurgery.surgery import convert

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
INPUT = (3, 8, 8)
FIELDS = ("variant", "backend", "median_ms", "spread_ms", "ratio_to_dense", "macs_ratio")
FAST = {"repeat": 2, "warmup": 0, "min_sample_ms": 0.1}


def tiny_model() -> nn.Module:
    """Stem conv, a 3x3 and a 1x1 conv, pooled, then a hidden linear and the classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def macs_by_hand(model: nn.Module, size=INPUT) -> int:
    """conv: H_out*W_out*C_out*(inputs per output)*kh*kw; linear: C_out*(inputs per output)."""
    total = 0
    h = w = size[1]
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, XConv2d)):
            assert m.stride == (1, 1) and m.padding == (m.kernel_size[0] // 2,) * 2  # H, W unchanged
            per_out = m.degree if isinstance(m, XConv2d) else m.in_channels // m.groups
            total += h * w * m.out_channels * per_out * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, (nn.Linear, XLinear)):
            total += m.out_features * (m.degree if isinstance(m, XLinear) else m.in_features)
    return total


def check_result(result: dict, variants, backends, compresses) -> None:
    for key in ("model", "compress", "batch", "threads", "versions", "machine", "results"):
        assert key in result, key
    assert result["versions"]["torch"] and result["machine"]["cpu"]
    rows = result["results"]
    seen = {(r["variant"], r["compress"], r["backend"]) for r in rows}
    want = {(v, 1.0 if v == "dense" else float(c), b) for v in variants for c in compresses for b in backends}
    assert seen == want and len(rows) == len(want)
    for r in rows:
        for f in FIELDS:
            assert f in r, f
        assert r["variant"] in VARIANTS and r["backend"] in BACKENDS
        assert r["median_ms"] > 0 and r["spread_ms"] >= 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        if r["variant"] == "dense":
            assert r["ratio_to_dense"] == 1 and r["macs_ratio"] == 1
        else:
            assert r["ratio_to_dense"] == pytest.approx(
                r["median_ms"] / next(d["median_ms"] for d in rows if d["variant"] == "dense"
                                      and d["backend"] == r["backend"]), rel=1e-2)


def test_bench_every_variant_and_backend_with_right_macs():
    model = tiny_model()
    result = bench(model, 2, input_size=INPUT, threads=1, **FAST)
    check_result(result, VARIANTS, BACKENDS, [2])
    assert result["compress"] == 2 and result["batch"] == 1 and result["threads"] == 1
    dense_macs = macs_by_hand(model)
    assert result["macs"]["dense"] == dense_macs
    # by hand for the default (stem and classifier stay dense; D = C_in // 2 elsewhere)
    x_macs = 64 * 16 * 3 * 9 + 64 * 32 * 8 * 9 + 64 * 32 * 16 + 32 * 16 + 10 * 32
    rows = {(r["variant"], r["backend"]): r for r in result["results"]}
    assert rows[("default", "ort")]["macs_ratio"] == pytest.approx(x_macs / dense_macs, abs=1e-4)
    for v, opts in VARIANT_OPTIONS.items():
        if v not in VARIANTS:  # opt-in variants (x-paired) are not in a default run
            continue
        converted, _ = convert(model, compress=2, input_size=INPUT, **opts)
        assert any(isinstance(m, XConv2d) for m in converted.modules())
        for b in BACKENDS:
            assert rows[(v, b)]["macs_ratio"] == pytest.approx(macs_by_hand(converted) / dense_macs, abs=1e-4)


def test_bench_several_compressions_share_one_dense():
    result = bench(tiny_model(), [2, 4], input_size=INPUT, threads=1, variants=("dense", "x-k1", "masked"),
                   backends=("torch", "torch-train"), **FAST)
    check_result(result, ("dense", "x-k1", "masked"), ("torch", "torch-train"), [2, 4])
    assert result["compress"] == [2.0, 4.0]
    macs = {(r["variant"], r["compress"]): r["macs_ratio"] for r in result["results"]}
    assert macs[("x-k1", 4.0)] < macs[("x-k1", 2.0)] < 1
    assert macs[("masked", 4.0)] == macs[("x-k1", 4.0)]  # masked executes dense but needs the same MACs


@pytest.mark.parametrize("execution", ["gather", "masked"])
def test_count_macs_counts_x_layers_compact(execution):
    conv = XConv2d(32, 48, 3, padding=1, compress=4, mixing=2, execution=execution)
    assert count_macs(conv, torch.randn(2, 32, 6, 5)) == 2 * 6 * 5 * 48 * 8 * 9
    lin = XLinear(32, 64, compress=4, mixing=2, execution=execution)
    assert count_macs(lin, torch.randn(3, 5, 32)) == 3 * 5 * 64 * 8


def test_bench_rejects_bad_requests():
    with pytest.raises(UserError, match="variant"):
        bench(tiny_model(), 2, variants=("dense", "sparse"), input_size=INPUT)
    with pytest.raises(UserError, match="compression"):
        bench(tiny_model(), 0.5, input_size=INPUT)
    with pytest.raises(UserError, match="backend"):
        bench(tiny_model(), 2, backends=("tensorrt",), input_size=INPUT)


def _parser():
    parser = argparse.ArgumentParser(prog="xsurgery")
    add_cli(parser.add_subparsers(dest="cmd"))
    return parser


def test_cli_json_plot_and_no_overwrite(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", "test_bench:tiny_model", "--compress", "2", "4", "--input-size", "3", "8", "8",
            "--threads", "1", "--backends", "torch", "ort", "--variants", "dense", "grouped", "x-k2",
            "--repeat", "2", "--warmup", "0", "--json", str(out), "--plot", str(png), "--ort-layout", "fixed",
            "--markdown"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    check_result(data, ("dense", "grouped", "x-k2"), ("torch", "ort"), [2, 4])
    assert data["model"] == "test_bench:tiny_model" and data["input_size"] == [3, 8, 8]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layouts = {r["variant"]: r["layout"] for r in data["results"] if r["backend"] == "ort"}
    assert layouts == {"dense": "none", "grouped": "gather", "x-k2": "gather"}
    printed = capsys.readouterr().out
    assert "x-k2" in printed and "| variant | C | torch | ort | MACs |" in printed  # rich and Markdown tables
    args = _parser().parse_args(argv)
    with pytest.raises(UserError, match="--force"):
        args.func(args)


def _bench_layers():
    spec = importlib.util.spec_from_file_location("bench_layers", ROOT / "tools" / "bench_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_layers_tool_runs_and_reports_all(tmp_path):
    tool = _bench_layers()
    out = tmp_path / "layers.json"
    assert tool.main(["--tiny", "--threads", "1", "--repeat", "2", "--warmup", "0", "--min-sample-ms", "0.1",
                      "--sweep", "--sweep-compress", "2", "4", "--sweep-backends", "torch", "ort",
                      "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    for shape in tool.TINY_SHAPES:
        family, name, kind, cin, cout, kernel, size = shape
        mine = [r for r in rows if r["shape"] == name]
        assert {(r["variant"], r["backend"]) for r in mine} == {
            (v, b) for v in tool.LAYER_VARIANTS for b in BACKENDS}
        for r in mine:
            # one layer: the MACs ratio is D / C_in with D = C_in // 4
            assert r["macs_ratio"] == pytest.approx(1.0 if r["variant"] == "dense" else (cin // 4) / cin, abs=1e-4)
            if r["variant"] == "dense":
                assert r["ratio_to_dense"] == 1
    sweep = data["sweep"]
    assert {r["execution"] for r in sweep} == {"gather", "masked"}
    assert {r["backend"] for r in sweep} == {"torch", "ort"}
    for r in sweep:
        assert r["blocks"] > 1 and r["out_per_block"] * r["blocks"] == r["out"]
    assert [r["backend"] for r in data["rules"]] == ["torch", "ort"]
    for rule in data["rules"]:
        pairs = {}
        for r in sweep:
            if r["backend"] == rule["backend"]:
                pairs.setdefault((r["shape"], r["compress"], r["blocks"]), {})[r["execution"]] = r["ratio_to_dense"]
        assert rule["best_blocks"]["cases"] == len(pairs)
        always = {ex: sum(p[ex] - min(p.values()) for p in pairs.values()) for ex in ("gather", "masked")}
        for best in (rule["best_blocks"], rule["best_out_per_block"]):
            assert 0 <= best["wrong"] <= best["cases"]
            assert best["loss"] <= min(always.values()) + 1e-3  # a threshold never loses to a fixed choice


class _Attention(nn.Module):
    def forward(self, x):  # x: [B, heads, L, d]
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_count_macs_sees_fused_attention():
    # q @ k^T and attn @ v: 2 * B * heads * L * L * d
    assert count_macs(_Attention(), torch.randn(2, 3, 7, 4)) == 2 * 2 * 3 * 7 * 7 * 4


# ----------------------------------------------------------------------------- baselines at equal MACs


def _wide_model() -> nn.Module:
    torch.manual_seed(0)  # wide enough that one channel moves the MACs by well under 3%
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def test_thin_baseline_matches_the_x_models_macs():
    from xsurgery.bench._baselines import MACS_TOL

    result = bench(_wide_model(), [2, 4], input_size=(3, 8, 8), threads=1, backends=("torch",),
                   variants=("dense", "default", "thin"), **FAST)
    rows = {(r["variant"], r["compress"]): r for r in result["results"]}
    for c in (2.0, 4.0):
        target = rows[("default", c)]["macs_ratio"]
        assert abs(rows[("thin", c)]["macs_ratio"] - target) <= MACS_TOL * target + 1e-4
        assert 0 < result["baselines"][f"thin-{c:g}"]["width"] < 1


def test_tp_baselines_match_the_x_models_macs():
    pytest.importorskip("torch_pruning")  # the optional extra tp (in dev)
    from xsurgery.bench._baselines import MACS_TOL

    result = bench(_wide_model(), 2, input_size=(3, 8, 8), threads=1, backends=("torch",),
                   variants=("dense", "default", "tp", "tp8"), **FAST)
    rows = {r["variant"]: r for r in result["results"]}
    target = rows["default"]["macs_ratio"]
    assert abs(rows["tp"]["macs_ratio"] - target) <= MACS_TOL * target + 1e-4, (rows["tp"]["macs_ratio"], target)
    # round_to=8: every pruned width a multiple of 8, at the nearest step (64 -> 8 widths: within 15%)
    assert abs(rows["tp8"]["macs_ratio"] - target) <= 0.15 * target
    assert result["baselines"]["tp8-2"]["round_to"] == 8


def test_tp_without_torch_pruning_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"xsurgery\[tp\]"):
        bench(_wide_model(), 2, input_size=(3, 8, 8), threads=1, backends=("torch",), variants=("dense", "tp"), **FAST)


def test_thin_keeps_the_first_channels_and_the_io():
    from xsurgery.bench._baselines import thin
    from xsurgery.bench._measure import _call

    model = tiny_model().eval()
    x = torch.randn(2, *INPUT)
    small = thin(model, 0.5, x, _call)
    convs = [m for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs[0].in_channels == 3 and convs[-1].out_features == 10  # image channels and classes kept
    assert [c.out_channels for c in convs[:3]] == [8, 16, 16] and convs[3].out_features == 16
    # the first half of each layer's weights: the thinned stem computes the dense stem's first 8 maps
    with torch.no_grad():
        assert torch.allclose(small[0](x), model[0](x)[:, :8], atol=1e-6)
    assert small(x).shape == (2, 10)


def test_thin_refuses_models_whose_channels_do_not_line_up():
    from xsurgery.bench._baselines import thin
    from xsurgery.bench._measure import _call

    # a flatten of a spatial map into the classifier: the first features are not the first channels
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 2))
    with pytest.raises(UserError, match="thin"):
        thin(model, 0.3, torch.randn(1, 3, 4, 4), _call)


def test_openvino_backend_times_files_tuned_there(monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "export"))
    from test_export_runtime import isolated  # OpenVINO in a child process (see there)

    isolated(_check_openvino_backend)


def _check_openvino_backend():
    result = bench(tiny_model(), 2, input_size=INPUT, threads=1, backends=("ort", "openvino"),
                   variants=("dense", "x-k2"), **FAST)
    rows = {(r["variant"], r["backend"]): r for r in result["results"]}
    assert set(rows) == {(v, b) for v in ("dense", "x-k2") for b in ("ort", "openvino")}
    assert rows[("dense", "openvino")]["ratio_to_dense"] == 1.0 and rows[("x-k2", "openvino")]["median_ms"] > 0
    assert rows[("x-k2", "openvino")]["layout"].startswith("auto") and result["versions"]["openvino"]
    assert rows[("x-k2", "openvino")]["macs_ratio"] == rows[("x-k2", "ort")]["macs_ratio"]
