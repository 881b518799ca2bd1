import pytest
import torch
from torch import nn

from xsurgery import XConv2d, XLinear
from xsurgery.graphs import build_graph
from xsurgery.layers import dense_weight, x_conv2d


def _reference_conv(layer: XConv2d, x: torch.Tensor) -> torch.Tensor:
    """Independent float64 reference: loop over outputs, dense conv on each output's inputs."""
    g = layer.graph
    w = layer.weight.detach().double()
    xd = x.double()
    outs = []
    per = layer.out_channels // g.blocks
    for o in range(layer.out_channels):
        cols = g.index[o // per]
        xo = xd[:, cols]
        if layer.padding_mode != "zeros":
            ph, pw = layer.padding
            xo = nn.functional.pad(xo, (pw, pw, ph, ph), mode=layer.padding_mode)
            pad = 0
        else:
            pad = layer.padding
        b = None if layer.bias is None else layer.bias.detach().double()[o:o + 1]
        outs.append(nn.functional.conv2d(xo, w[o:o + 1], b, layer.stride, pad, layer.dilation))
    return torch.cat(outs, dim=1)


CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, bias, compress, mixing)
    (32, 64, 1, 1, 0, 1, True, 2, 1),
    (32, 32, 1, 1, 0, 1, False, 4, 2),
    (32, 48, 3, 2, 1, 1, True, 4, 2),
    (32, 32, 3, 1, 2, 2, False, 2, 4),
    (24, 36, 3, 2, 1, 1, True, 3, 2),
    (16, 16, (3, 1), 1, (1, 0), 1, True, 4, 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_executions_agree(case):
    cin, cout, k, s, p, d, bias, c, mix = case
    torch.manual_seed(0)
    layer = XConv2d(cin, cout, k, s, p, d, bias=bias, compress=c, mixing=mix, seed=5)
    x = torch.randn(2, cin, 11, 10, requires_grad=True)
    ref = _reference_conv(layer, x.detach())
    outs, grads = {}, {}
    for ex in ("gather", "masked"):
        layer.execution = ex
        y = layer(x)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        gx, gw = torch.autograd.grad((y * torch.cos(y)).sum(), (x, layer.weight))
        outs[ex], grads[ex] = y, (gx, gw)
    dense = layer.to_dense()
    torch.testing.assert_close(dense(x), outs["gather"], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["gather"], grads["masked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the dense layer's gradient restricted to the kept connections equals the compact one
    gd = torch.autograd.grad((dense(x) * torch.cos(dense(x))).sum(), dense.weight)[0]
    mask = layer.graph.mask()
    assert gd[~mask].abs().sum() > 0  # dense weights elsewhere would learn ...
    kept = dense_weight(grads["gather"][1], layer.index, cin, layer.blocks)
    torch.testing.assert_close(gd * mask[..., None, None], kept, rtol=1e-4, atol=1e-4)


def test_conv_gradcheck_both_executions():
    layer = XConv2d(8, 8, 3, padding=1, compress=2, mixing=2, seed=1).double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.double, requires_grad=True)
    for ex in ("gather", "masked"):
        fn = lambda x, w, b, ex=ex: x_conv2d(x, w, layer.index, b, 1, (1, 1), 1, blocks=layer.blocks, execution=ex)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.bias))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    layer = XConv2d(8, 8, 3, padding=1, padding_mode=mode, compress=2, seed=0)
    x = torch.randn(2, 8, 6, 6)
    ref = _reference_conv(layer, x)
    for ex in ("gather", "masked"):
        layer.execution = ex
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense()(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compress,mixing", [(2, 1), (4, 2), (8, 4)])
def test_linear_executions_agree(bias, compress, mixing):
    torch.manual_seed(0)
    layer = XLinear(64, 48, bias=bias, compress=compress, mixing=mixing, seed=2)
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    layer = layer.double()
    mask = layer.graph.mask().double()
    ref_w = torch.zeros(48, 64, dtype=torch.float64)
    per = 48 // layer.blocks
    for o in range(48):
        ref_w[o, layer.graph.index[o // per]] = layer.weight.detach()[o]
    ref = x.detach() @ ref_w.T + (0 if layer.bias is None else layer.bias.detach())
    grads = []
    for ex in ("gather", "masked"):
        layer.execution = ex
        y = layer(x)
        assert y.shape == (3, 5, 48)
        torch.testing.assert_close(y, ref)
        grads.append(torch.autograd.grad(y.square().sum(), (x, layer.weight)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.to_dense()(x), ref)
    assert (layer.to_dense().weight * (1 - mask)).abs().max() == 0
    assert torch.autograd.gradcheck(lambda x: layer(x), (x[:1, :2],))


def test_full_degree_reproduces_dense_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    for ex in ("gather", "masked"):
        xc = XConv2d.from_dense(conv, degree=16, mixing=1, graph="grouped", init="keep", execution=ex)
        assert xc.blocks == 1
        torch.testing.assert_close(xc(x), conv(x), rtol=0, atol=0)
    xr = XConv2d.from_dense(conv, compress=1, init="keep", seed=3)  # random order: same sums, reordered
    torch.testing.assert_close(xr(x), conv(x), rtol=1e-5, atol=1e-5)
    lin = nn.Linear(16, 8)
    xl = XLinear.from_dense(lin, compress=1, graph="grouped", init="keep", execution="masked")
    v = torch.randn(4, 16)
    torch.testing.assert_close(xl(v), lin(v), rtol=0, atol=0)


def test_keep_init_copies_kept_connections():
    conv = nn.Conv2d(16, 16, 3)
    xc = XConv2d.from_dense(conv, compress=4, init="keep", seed=0)
    dense = xc.to_dense().weight
    mask = xc.graph.mask()
    torch.testing.assert_close(dense[mask], conv.weight.detach()[mask])
    assert dense[~mask].abs().max() == 0


def test_kaiming_fan_in_is_degree():
    torch.manual_seed(0)
    xc = XConv2d(256, 256, 3, compress=8)
    fan_in = 32 * 9  # D * kh * kw
    assert xc.weight.shape == (256, 32, 3, 3)
    assert xc.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.03)
    assert xc.bias.abs().max() <= 1 / fan_in**0.5
    xl = XLinear(512, 256, compress=4)
    assert xl.weight.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.03)


def test_state_dict_round_trip_and_seeds():
    a = XConv2d(32, 32, 3, compress=4, seed=11)
    b = XConv2d(32, 32, 3, compress=4, seed=12)
    assert "index" in a.state_dict() and a.state_dict()["index"].dtype == torch.int64
    assert not torch.equal(a.index, b.index)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 32, 7, 7)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert torch.equal(b.graph.index, a.graph.index)
    c = XConv2d(32, 32, 3, compress=4, seed=11)
    assert torch.equal(a.index, c.index)


def test_identity_index_skips_gather_and_updates_on_load():
    g = XConv2d(16, 16, 1, compress=4, graph="grouped")
    assert g._identity
    r = XConv2d(16, 16, 1, compress=4, mixing=1, seed=0)
    assert not r._identity
    r.load_state_dict(g.state_dict())
    assert r._identity
    x = torch.randn(1, 16, 3, 3)
    torch.testing.assert_close(r(x), g(x), rtol=0, atol=0)
    lin = XLinear(16, 8, compress=4, graph="grouped", execution="gather")
    assert lin._identity
    v = torch.randn(3, 16)
    ref = v @ lin.to_dense().weight.T + lin.bias
    torch.testing.assert_close(lin(v), ref)


def test_extra_repr():
    s = repr(XConv2d(256, 256, 3, padding=1, compress=4, mixing=2, seed=0))
    assert "256, 256, kernel_size=(3, 3)" in s and "degree=64, blocks=8, graph=paired" in s  # the default graph auto
    assert "degree=16, blocks=8" in repr(XLinear(64, 64, compress=4, mixing=2))
    assert "degree=16, blocks=4, graph=random" in repr(XLinear(64, 64, compress=4))  # the default: mixing 1


def test_prebuilt_graph_and_devices_dtypes():
    g = build_graph(16, 32, 4, mixing=2, seed=0)
    layer = XConv2d(16, 32, 1, graph=g, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.degree == 4 and layer.blocks == g.blocks
    with pytest.raises(ValueError, match="graph is 16->32"):
        XConv2d(16, 16, 1, graph=g)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"compress": 0}, "compression must be >= 1"),
        ({"compress": -1}, "compression must be >= 1"),
        ({"degree": 0}, "degree must be a positive integer"),
        ({"degree": 17}, "larger than the 16 input channels"),
        ({"degree": 4, "blocks": 3}, "must divide"),
        ({"compress": 2, "execution": "fast"}, "unknown execution"),
        ({"compress": 2, "graph": "nope"}, "unknown graph"),
        ({"compress": 2, "mixing": 0}, "mixing must be a positive integer"),
    ],
)
def test_impossible_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XConv2d(16, 16, 3, **kwargs)
    if "blocks" not in kwargs:
        with pytest.raises(ValueError, match=match):
            XLinear(16, 16, **kwargs)


def test_from_dense_rejects_grouped_and_bad_init():
    with pytest.raises(ValueError, match="groups=1"):
        XConv2d.from_dense(nn.Conv2d(16, 16, 3, groups=16), compress=2)
    with pytest.raises(ValueError, match="unknown init"):
        XConv2d.from_dense(nn.Conv2d(16, 16, 3), compress=2, init="zeros")


def test_masked_inference_cache_follows_weight_updates():
    layer = XConv2d(16, 16, 3, padding=1, compress=4, execution="masked", seed=0)
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, layer.to_dense()(x))
        layer.weight.mul_(2)  # in-place update, as an optimizer step does
        torch.testing.assert_close(layer(x), 2 * first - layer.bias.view(1, -1, 1, 1))
    y = layer(x)  # with autograd: no cache, gradients reach the compact weight
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    lin = XLinear(16, 8, compress=2, execution="masked")
    v = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(lin(v), lin.to_dense()(v))
        lin.load_state_dict({k: t * 3 if k == "weight" else t for k, t in lin.state_dict().items()})
        torch.testing.assert_close(lin(v), lin.to_dense()(v))
