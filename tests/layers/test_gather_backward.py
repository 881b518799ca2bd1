"""The gather with an inverse-index backward (no index_add): same values and gradients as the
masked-dense reference, gradcheck in float64, and where it is (not) used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xsurgery.layers import XConv2d, XLinear, _functional, gather_channels, inverse_index, x_conv2d, x_linear


def test_inverse_index_of_a_regular_index_and_none_otherwise():
    index = torch.tensor([2, 0, 1, 0, 2, 1])  # every input of 3 read twice
    inv = inverse_index(index, 3)
    assert inv.shape == (2, 3)
    for j in range(2):
        assert index[inv[j]].tolist() == [0, 1, 2]
    assert sorted(inv.reshape(-1).tolist()) == list(range(6))
    assert inverse_index(torch.tensor([0, 0, 1, 2]), 3) is None  # 0 read twice, the others once
    assert inverse_index(torch.tensor([0, 1, 0, 1]), 3) is None  # input 2 never read
    assert inverse_index(torch.tensor([0, 1]), 3) is None  # 2 positions for 3 inputs


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gather_channels_gradient_is_the_scatter_sum(dim):
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(5, generator=gen).repeat(3)[torch.randperm(15, generator=gen)]  # k = 3
    inv = inverse_index(index, 5)
    x = torch.randn(5, 5, 5, dtype=torch.double, requires_grad=True)
    y = gather_channels(x, dim, index, inv)
    assert y.grad_fn is not None and "RegularGather" in type(y.grad_fn).__name__
    g = torch.randn(y.shape, dtype=torch.double, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    # numpy: each input's gradient is the sum of the gradient at every position that read it
    d = dim % 3
    want = np.zeros(x.shape)
    gn = np.moveaxis(g.numpy(), d, 0)
    wm = np.moveaxis(want, d, 0)
    for pos, c in enumerate(index.tolist()):
        wm[c] += gn[pos]
    np.testing.assert_allclose(gx.numpy(), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: gather_channels(t, dim, index, inv), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_channels(t, dim, index, inv) ** 2, (x,))


def test_plain_index_select_without_gradient_or_inverse():
    x = torch.randn(2, 6)
    index = torch.tensor([1, 0, 2, 5, 4, 3])
    inv = inverse_index(index, 6)
    assert gather_channels(x, 1, index, inv).grad_fn is None  # no gradient wanted
    xr = x.clone().requires_grad_()
    assert "IndexSelect" in type(gather_channels(xr, 1, index, None).grad_fn).__name__
    with torch.no_grad():
        assert gather_channels(xr, 1, index, inv).grad_fn is None


@pytest.mark.parametrize("mixing", [1, 2, 4])
def test_x_layers_carry_the_inverse_of_their_index(mixing):
    for layer in (XConv2d(16, 16, 3, compress=4, mixing=mixing, seed=3), XLinear(16, 32, compress=4, mixing=mixing)):
        inv = layer._inverse
        assert inv is not None and inv.shape == (mixing, 16)
        assert (layer.index[inv] == torch.arange(16)).all()
    grouped = XLinear(16, 16, compress=4, mixing=1, graph="grouped")
    assert grouped._identity and grouped._inverse is None
    assert "_inverse" not in grouped.state_dict() and "_inverse" not in XConv2d(8, 8, 1, compress=2).state_dict()


def test_conv_gather_gradients_equal_masked_in_float64():
    layer = XConv2d(8, 12, 3, padding=1, compress=2, mixing=2, seed=1).double()
    assert layer._inverse is not None
    x = torch.randn(2, 8, 5, 5, dtype=torch.double, requires_grad=True)

    def run(ex, inverse):
        return lambda x, w, b: x_conv2d(x, w, layer.index, b, 1, (1, 1), 1, blocks=layer.blocks, execution=ex,
                                        inverse=inverse)

    fast, ref = run("gather", layer._inverse), run("masked", None)
    assert torch.autograd.gradcheck(fast, (x, layer.weight, layer.bias))
    g = torch.randn(2, 12, 5, 5, dtype=torch.double)
    got = torch.autograd.grad(fast(x, layer.weight, layer.bias), (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(ref(x, layer.weight, layer.bias), (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_linear_gather_gradients_equal_masked_in_float64():
    layer = XLinear(12, 18, compress=3, mixing=2).double()  # G = 6 blocks of 3 outputs, D = 4
    assert layer._inverse is not None and layer._inverse.shape == (2, 12)
    x = torch.randn(3, 2, 12, dtype=torch.double, requires_grad=True)

    def run(ex, inverse):
        return lambda x, w, b: x_linear(x, w, layer.index, b, blocks=layer.blocks, execution=ex, inverse=inverse)

    fast, ref = run("gather", layer._inverse), run("masked", None)
    assert torch.autograd.gradcheck(fast, (x, layer.weight, layer.bias))
    g = torch.randn(3, 2, 18, dtype=torch.double)
    got = torch.autograd.grad(fast(x, layer.weight, layer.bias), (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(ref(x, layer.weight, layer.bias), (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_layer_forward_uses_the_regular_gather_when_training(monkeypatch):
    calls = []
    real = _functional._RegularGather.apply
    monkeypatch.setattr(_functional._RegularGather, "apply", lambda *a: calls.append(1) or real(*a))
    layer = XConv2d(8, 8, 1, compress=2, mixing=2, execution="gather", seed=0)
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert calls == [1] and x.grad is not None
    with torch.no_grad():
        layer(x)
    assert calls == [1]  # inference: plain index_select


def test_inverse_follows_a_loaded_index_and_the_device_move():
    a, b = XLinear(16, 16, compress=4, mixing=2, seed=1), XLinear(16, 16, compress=4, mixing=2, seed=2)
    assert not torch.equal(a.index, b.index)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a._inverse, b._inverse) and (a.index[a._inverse] == torch.arange(16)).all()
    moved = a.to(torch.float64)
    assert moved._inverse.dtype == torch.int64
