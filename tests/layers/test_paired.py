"""graph="paired" (k = 2 as a natural and one permuted copy) and its export form Conv + Conv(Gather)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xsurgery import XConv2d
from xsurgery.graphs import build_graph, list_graphs, sensitivity_depth, spectral_gap
from xsurgery.layers import XConv1d, dense_weight

SHAPES = [(256, 64, 4), (64, 64, 4), (64, 256, 2), (16, 16, 2), (48, 96, 3)]


@pytest.mark.parametrize("c_in,c_out,compress", SHAPES)
def test_paired_rows_are_own_chunk_then_one_permutation(c_in, c_out, compress):
    assert "paired" in list_graphs()
    d = c_in // compress
    g = build_graph(c_in, c_out, d, mixing=1, construction="paired", seed=5)  # paired is k = 2 whatever mixing says
    half = d // 2
    assert g.blocks * g.degree == 2 * c_in and g.blocks * half == c_in
    rows = g.index
    assert torch.equal(rows[:, :half].reshape(-1), torch.arange(c_in))  # block b: its own contiguous chunk
    assert torch.equal(rows[:, half:].reshape(-1).sort().values, torch.arange(c_in))  # one permutation
    for r in rows.tolist():
        assert len(set(r)) == len(r)  # no block reads an input twice
    assert torch.equal(torch.bincount(rows.reshape(-1), minlength=c_in), torch.full((c_in,), 2))


@pytest.mark.parametrize("c_in,c_out,compress", SHAPES)
def test_paired_is_an_expander_like_random(c_in, c_out, compress):
    d = c_in // compress
    paired = [spectral_gap(build_graph(c_in, c_out, d, mixing=2, construction="paired", seed=s)) for s in range(4)]
    rnd = [spectral_gap(build_graph(c_in, c_out, d, mixing=2, construction="random", seed=s)) for s in range(4)]
    assert min(paired) > 0.0
    # the same spectrum in distribution: the mean gap within a factor of random's
    assert sum(paired) / 4 >= 0.7 * sum(rnd) / 4, (paired, rnd)


def test_paired_chain_reaches_every_input_like_random():
    # a bottleneck-like chain 256 -> 64 -> 64 -> 256 -> 64 ...; depth after which every output
    # depends on every input (Theorem 3.1), against the same chain drawn with random
    sizes = [256, 64, 64, 256, 64, 64, 256]
    depths = {}
    for construction in ("paired", "random"):
        chain = [build_graph(a, b, a // 4, mixing=2, construction=construction, seed=i)
                 for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
        depths[construction] = sensitivity_depth(chain)
    assert math.isfinite(depths["paired"]) and depths["paired"] <= depths["random"] + 1, depths


def test_paired_falls_back_to_random_where_sizes_do_not_split():
    # D odd: no half chunk; the layer is drawn like random (balanced, no duplicates)
    g = build_graph(15, 30, 5, mixing=2, construction="paired", seed=0)
    ref = build_graph(15, 30, 5, blocks=g.blocks, construction="random", seed=0)
    assert torch.equal(g.index, ref.index)


def _masked_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """float64 dense conv with the scattered weight: the independent reference."""
    w = dense_weight(layer.weight.detach().double(), layer.index, layer.in_features, layer.blocks)
    fn = F.conv1d if isinstance(layer, XConv1d) else F.conv2d
    b = None if layer.bias is None else layer.bias.detach().double()
    return fn(x.double(), w, b, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("execution", ["gather", "masked"])
def test_paired_layer_matches_float64_masked_dense(execution):
    torch.manual_seed(0)
    layer = XConv2d(32, 48, 3, padding=1, stride=2, compress=4, graph="paired", seed=2, execution=execution).eval()
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _masked_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_paired_export_form_matches_float64_reference():
    from xsurgery.export._forms import _layer_form, _PairedConv, paired_perm

    torch.manual_seed(1)
    for layer, x in ((XConv2d(32, 64, 1, compress=2, graph="paired", seed=1), torch.randn(2, 32, 5, 5)),
                     (XConv1d(16, 16, 3, padding=1, compress=4, graph="paired", seed=4), torch.randn(3, 16, 11))):
        layer.eval()
        assert paired_perm(layer) is not None
        form = _layer_form(layer, "gather")
        assert isinstance(form, _PairedConv)
        with torch.no_grad():
            torch.testing.assert_close(form(x).double(), _masked_reference(layer, x), rtol=1e-5, atol=1e-5)
    # a random graph has no such split: its gather form stays Gather + one grouped conv
    assert paired_perm(XConv2d(32, 64, 1, compress=2, graph="random")) is None


def test_paired_model_exports_as_conv_plus_gathered_conv_and_agrees_in_ort(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from xsurgery.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        XConv2d(16, 32, 1, compress=2, graph="paired", seed=1), nn.BatchNorm2d(32), nn.ReLU(),
        XConv2d(32, 32, 3, padding=1, compress=4, graph="paired", seed=2, padding_mode="circular"), nn.ReLU(),
        XConv2d(32, 16, 1, compress=4, mixing=2, graph="random", seed=3),
    ).eval()
    res = export_onnx(model, tmp_path / "p.onnx", input_size=(16, 8, 8), layout="gather", verbose=False, threads=1)
    assert res.max_rel_err < 1e-4
    proto = onnx.load(tmp_path / "p.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    gathers = sorted(len(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "Gather" and n.input[1] in inits)
    # paired layers gather C_in channels once (16, 32); the random one gathers k * C_in = 64
    assert gathers == [16, 32, 64]
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 2 + 2 + 1
    x = torch.randn(3, 16, 8, 8)
    got = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model.double()(x.double())
    torch.testing.assert_close(torch.from_numpy(got).double(), ref, rtol=1e-4, atol=1e-5)
