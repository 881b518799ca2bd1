"""One SparsityConfig everywhere, and the registries layers/ and graphs/ keep (README, Layout)."""

import dataclasses

import pytest
import torch
from torch import nn

import xsurgery
from xsurgery.graphs import build_graph, choose_blocks, graph_construction, list_graphs, register_graph
from xsurgery.layers import (
    X_LAYERS,
    LayerKind,
    SparsityConfig,
    XConv1d,
    XConv2d,
    XConv3d,
    XLinear,
    kind_family,
    layer_kind,
    list_executions,
    register_layer_kind,
    x_conv2d,
)


def test_config_is_frozen_and_keywords_override_it():
    cfg = SparsityConfig(compress=4, mixing=1, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mixing = 2
    assert SparsityConfig.of(cfg, mixing=2) == SparsityConfig(compress=4, mixing=2, seed=3)
    assert SparsityConfig.of(cfg) is not cfg and SparsityConfig.of(cfg) == cfg
    with pytest.raises(TypeError, match="mixng"):
        SparsityConfig.of(cfg, mixng=2)
    with pytest.raises(TypeError, match="SparsityConfig"):
        SparsityConfig.of({"compress": 4})


def test_layers_take_the_config_or_its_fields_alike():
    cfg = SparsityConfig(compress=4, mixing=2, graph="random", seed=7)
    a = XConv2d(32, 48, 3, padding=1, config=cfg)
    b = XConv2d(32, 48, 3, padding=1, compress=4, mixing=2, graph="random", seed=7)
    c = XConv2d(32, 48, 3, 1, 1, 1, True, "zeros", cfg)  # positional, after nn.Conv2d's own arguments
    for other in (b, c):
        assert (other.degree, other.blocks) == (a.degree, a.blocks) == (8, 8)
        assert torch.equal(other.index, a.index)
    lin = XLinear(64, 32, config=cfg, seed=8)  # a keyword wins over the config
    assert lin.graph_seed == 8 and lin.degree == 16
    dense = nn.Conv1d(16, 16, 3)
    x = XConv1d.from_dense(dense, SparsityConfig(degree=4), init="keep")
    assert x.degree == 4
    assert torch.allclose(x.to_dense().weight, dense.weight * (x.to_dense().weight != 0))


def test_convert_takes_the_config_and_keywords_as_a_shim():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1))
    cfg = SparsityConfig(compress=4, mixing=1, mix_points="every")
    m1, r1 = xsurgery.convert(net, cfg, example_inputs=torch.randn(1, 3, 8, 8))
    m2, r2 = xsurgery.convert(net, compress=4, mixing=1, mix_points="every", example_inputs=torch.randn(1, 3, 8, 8))
    assert [d["degree"] for d in r1.to_dict()["layers"]] == [d["degree"] for d in r2.to_dict()["layers"]]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()) if a.dtype == torch.int64)
    assert m1._xsurgery_spec["mixing"] == 1 and m1._xsurgery_spec["compress"] == 4
    with pytest.raises(xsurgery.UserError, match="per-layer"):
        xsurgery.convert(net, SparsityConfig(blocks=2))


def test_every_dense_kind_maps_to_its_x_layer():
    cases = {nn.Conv1d(4, 4, 1): XConv1d, nn.Conv2d(4, 4, 3): XConv2d, nn.Conv3d(4, 4, 1): XConv3d,
             nn.Linear(4, 4): XLinear}
    for dense, x_cls in cases.items():
        kind = layer_kind(dense)
        assert kind is not None and kind.x_class is x_cls
        assert isinstance(kind.x_class.from_dense(dense, compress=2), X_LAYERS)
    assert kind_family(nn.Conv2d(4, 4, 1)) == "pointwise" and kind_family(nn.Conv2d(4, 4, 3)) == "conv"
    assert kind_family(nn.Conv2d(4, 4, 3, groups=4)) == "depthwise" and kind_family(nn.Linear(3, 3)) == "linear"
    assert layer_kind(nn.ConvTranspose2d(4, 4, 3)) is None and layer_kind(nn.Embedding(4, 4)) is None
    with pytest.raises(ValueError, match="already registered"):
        register_layer_kind(LayerKind("linear", XLinear, lambda m: False, None, None, None, None))


def test_executions_are_registered_and_agree():
    assert list_executions()[:3] == ["auto", "gather", "masked"]
    x, conv = torch.randn(2, 16, 5, 5), XConv2d(16, 8, 3, compress=4)
    args = (x, conv.weight, conv.index, conv.bias, 1, 0, 1)
    out = {e: x_conv2d(*args, blocks=conv.blocks, execution=e) for e in ("gather", "masked")}
    assert torch.allclose(out["gather"], out["masked"], atol=1e-5)
    with pytest.raises(ValueError, match="unknown execution"):
        x_conv2d(*args, blocks=conv.blocks, execution="sparse")


def test_graph_constructions_declare_their_constraints():
    assert graph_construction("grouped").mixing == 1 and not graph_construction("grouped").seeded
    assert graph_construction("exact").one_block_per_output and graph_construction("cayley").power_of_two_blocks
    name = "test-contiguous-once"

    @register_graph(name, mixing=1, seeded=False, summary="contiguous, for this test")
    def _contiguous(cin, cout, degree, blocks, seed):
        return torch.arange(blocks * degree).reshape(blocks, degree) % cin

    try:
        assert name in list_graphs()
        assert choose_blocks(64, 64, 16, mixing=4, graph=name) == 4  # its fixed mixing 1 wins over the request
        g = build_graph(64, 64, 16, mixing=4, construction=name, seed=5)
        assert g.blocks == 4 and g.seed is None
        with pytest.raises(ValueError, match="already registered"):
            register_graph(name)(_contiguous)
    finally:
        from xsurgery.graphs import _core

        del _core._GRAPHS[name]
    assert name not in list_graphs()


def test_auto_execution_gathers_every_mixing_1_layer_and_keeps_the_thresholds_elsewhere():
    from xsurgery.layers._functional import MIN_OUTPUTS_PER_BLOCK, auto_execution

    assert MIN_OUTPUTS_PER_BLOCK["linear"] > 16
    # mixing 1 (G * D = C_in: the gather is a permutation): gather at 16 outputs per block
    assert auto_execution(32, 512, 16, 512, kind="linear") == "gather"
    assert auto_execution(16, 32, 4, 64, kind="pointwise") == "gather"  # 2 outputs per block
    # mixing 2 at the same outputs per block: below the linear threshold, masked
    assert auto_execution(32, 512, 32, 512, kind="linear") == "masked"
    assert auto_execution(4, 512, 256, 512, kind="linear") == "gather"  # 128 outputs per block
    assert auto_execution(1, 512, 512, 512, kind="linear") == "masked"  # one block: the dense layer
    assert auto_execution(32, 512, 16, 512, torch.device("meta"), kind="linear") == "masked"  # not a CPU
    mlp = XLinear(512, 512, compress=32)  # the defaults: mixing 1
    assert mlp.blocks == 32 and mlp.resolved_execution(torch.device("cpu")) == "gather"
    assert XLinear(512, 512, compress=32, mixing=2).resolved_execution(torch.device("cpu")) == "masked"
