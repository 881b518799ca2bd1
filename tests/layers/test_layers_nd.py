"""XConv1d / XConv2d / XConv3d: one N-d implementation, the same checks in every dim."""

import pytest
import torch
from torch import nn

from xsurgery import XConv1d, XConv2d, XConv3d, XLinear
from xsurgery.layers import X_CONVS, dense_weight, is_conv1d_linear, x_convnd

XCLS = {1: XConv1d, 2: XConv2d, 3: XConv3d}
CONV_FN = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}
SPATIAL = {1: (13,), 2: (7, 6), 3: (5, 4, 6)}


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """float64, output by output: a dense conv over exactly the inputs that output reads."""
    dims = layer._dims
    g = layer.graph
    w, xd = layer.weight.detach().double(), x.double()
    per = layer.out_channels // g.blocks
    outs = []
    for o in range(layer.out_channels):
        xo = xd[:, g.index[o // per]]
        pad = layer.padding
        if layer.padding_mode != "zeros":
            xo = nn.functional.pad(xo, [p for q in reversed(layer.padding) for p in (q, q)], mode=layer.padding_mode)
            pad = 0
        b = None if layer.bias is None else layer.bias.detach().double()[o:o + 1]
        outs.append(CONV_FN[dims](xo, w[o:o + 1], b, layer.stride, pad, layer.dilation))
    return torch.cat(outs, dim=1)


CASES = [
    # (cin, cout, kernel, stride, padding, dilation, bias, compress, mixing, padding_mode)
    (16, 32, 1, 1, 0, 1, True, 2, 1, "zeros"),
    (16, 24, 3, 2, 1, 1, False, 4, 2, "zeros"),
    (12, 12, 3, 1, 2, 2, True, 3, 2, "zeros"),
    (8, 8, 3, 1, 1, 1, True, 2, 2, "reflect"),
]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("case", CASES)
def test_executions_agree_with_float64_reference(dims, case):
    cin, cout, k, s, p, d, bias, c, mix, mode = case
    torch.manual_seed(0)
    layer = XCLS[dims](cin, cout, k, s, p, d, bias=bias, padding_mode=mode, compress=c, mixing=mix, seed=3)
    assert layer.weight.shape == (cout, layer.degree, *([k] * dims))
    x = torch.randn(2, cin, *SPATIAL[dims], requires_grad=True)
    ref = _reference(layer, x.detach())
    grads = {}
    for ex in ("gather", "masked"):
        layer.execution = ex
        y = layer(x)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        grads[ex] = torch.autograd.grad((y * torch.cos(y)).sum(), (x, layer.weight))
    for a, b in zip(grads["gather"], grads["masked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    dense = layer.to_dense()
    assert type(dense) is layer._dense_cls
    torch.testing.assert_close(dense(x).double(), ref, rtol=1e-5, atol=1e-5)
    # gradient of the dense twin restricted to the kept connections equals the compact one
    yd = dense(x)
    gd = torch.autograd.grad((yd * torch.cos(yd)).sum(), dense.weight)[0]
    mask = layer.graph.mask().view(cout, cin, *([1] * dims))
    kept = dense_weight(grads["gather"][1], layer.index, cin, layer.blocks)
    torch.testing.assert_close(gd * mask, kept, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradcheck(dims):
    layer = XCLS[dims](8, 8, 3, padding=1, compress=2, mixing=2, seed=1).double()
    x = torch.randn(1, 8, *([3] * dims), dtype=torch.double, requires_grad=True)
    for ex in ("gather", "masked"):
        def fn(x, w, b, ex=ex):
            return x_convnd(x, w, layer.index, b, 1, layer.padding, 1, blocks=layer.blocks, execution=ex)
        assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.bias))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_full_degree_is_dense_bit_exact(dims):
    torch.manual_seed(0)
    dense = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](8, 12, 3, padding=1)
    layer = X_CONVS[type(dense)].from_dense(dense, degree=8, init="keep", execution="masked")
    assert type(layer) is XCLS[dims] and layer.degree == 8
    x = torch.randn(2, 8, *SPATIAL[dims])
    with torch.no_grad():
        assert torch.equal(layer(x), dense(x))
        assert torch.equal(layer.to_dense().weight, dense.weight)


@pytest.mark.parametrize("dims", [1, 3])
def test_from_dense_keep_and_state_dict_keys(dims):
    dense = {1: nn.Conv1d, 3: nn.Conv3d}[dims](8, 8, 1, bias=False)
    layer = XCLS[dims].from_dense(dense, compress=2, init="keep", seed=2)
    w = dense_weight(layer.weight, layer.index, 8, layer.blocks)
    mask = layer.graph.mask().view(8, 8, *([1] * dims))
    assert torch.equal(w, dense.weight.detach() * mask)
    assert sorted(layer.state_dict()) == ["index", "weight"]
    with pytest.raises(ValueError, match="nn.Conv2d"):
        XConv2d.from_dense(dense)
    assert "degree=4" in repr(layer) and "kernel_size=(1" in repr(layer)


def test_xconv2d_public_api_unchanged():
    layer = XConv2d(8, 8, 3, padding=1, compress=2, seed=0)
    assert sorted(layer.state_dict()) == ["bias", "index", "weight"]
    assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)
    assert repr(layer) == "XConv2d(8, 8, kernel_size=(3, 3), padding=(1, 1), degree=4, blocks=2, graph=random)"


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 has it: weight [in, out], y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


def test_hf_conv1d_becomes_xlinear_with_the_transpose():
    torch.manual_seed(0)
    m = Conv1D(12, 8)  # 8 -> 12
    assert is_conv1d_linear(m) and not is_conv1d_linear(nn.Linear(8, 12))
    full = XLinear.from_dense(m, degree=8, init="keep", execution="masked")
    assert (full.in_features, full.out_features) == (8, 12)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(full(x), m(x), rtol=1e-6, atol=1e-6)
        sparse = XLinear.from_dense(m, compress=2, init="keep")
        ref = x.double() @ (m.weight.double() * sparse.graph.mask().t().double()) + m.bias.double()
        torch.testing.assert_close(sparse(x).double(), ref, rtol=1e-5, atol=1e-5)
