"""init="project": the block solve, the unfolded rows, the fit against numpy, and its errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xsurgery
from xsurgery.errors import UserError
from xsurgery.layers import X_LAYERS
from xsurgery.surgery import layer_rows, ridge_solve


def _correlated(n, d, rank, seed=0):
    """Rows whose d features are mixtures of ``rank`` factors plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return z @ torch.randn(rank, d, generator=g, dtype=torch.float64) + 0.05 * torch.randn(n, d, generator=g,
                                                                                           dtype=torch.float64)


def test_ridge_solve_matches_numpy_augmented_lstsq():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 12)), rng.normal(size=(200, 5))
    lam = 0.7
    # independent: lstsq of the augmented system [X; sqrt(lam) I] W^T = [Y; 0]
    a = np.vstack([x, np.sqrt(lam) * np.eye(12)])
    b = np.vstack([y, np.zeros((12, 5))])
    want = np.linalg.lstsq(a, b, rcond=None)[0].T
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    got = ridge_solve(xt.T @ xt, xt.T @ yt, lam)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
    # lam = 0 on rank-deficient data: the minimum-norm least-squares solution
    xr = np.hstack([x, x[:, :2]])
    xrt = torch.from_numpy(xr)
    got0 = ridge_solve(xrt.T @ xrt, xrt.T @ yt, 0.0)
    np.testing.assert_allclose(got0.numpy(), np.linalg.lstsq(xr, y, rcond=None)[0].T, atol=1e-8)


@pytest.mark.parametrize("layer", [
    nn.Conv1d(6, 8, 3, stride=2, padding=2, dilation=2),
    nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
    nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
    nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1),
    nn.Linear(6, 8),
])
def test_rows_times_dense_weight_are_the_layer_outputs(layer):
    layer = layer.double()
    shape = {nn.Conv1d: (2, 6, 11), nn.Conv2d: (2, 6, 7, 9), nn.Conv3d: (2, 4, 5, 6, 7), nn.Linear: (2, 3, 6)}
    x = torch.randn(*shape[type(layer)], dtype=torch.float64)
    y = layer(x)
    rows = layer_rows(layer, x)
    out = rows @ layer.weight.reshape(layer.weight.shape[0], -1).T
    want = y.movedim(1, -1) if isinstance(layer, nn.modules.conv._ConvNd) else y
    want = want.reshape(-1, y.shape[1] if isinstance(layer, nn.modules.conv._ConvNd) else y.shape[-1])
    if layer.bias is not None:
        want = want - layer.bias
    torch.testing.assert_close(out, want)
    # a channel subset: the same rows restricted to those channels (compact weight order: channel, then kernel)
    ch = torch.tensor([3, 0, 2])
    sub = layer_rows(layer, x, ch)
    area = rows.shape[1] // layer.weight.shape[1]
    cols = torch.cat([torch.arange(c * area, (c + 1) * area) for c in ch.tolist()])
    torch.testing.assert_close(sub, rows[:, cols])


def _block_fit_numpy(xrows, yrows, ridge):
    """Ridge fit of one block from raw rows in numpy, relative lambda as documented."""
    gram = xrows.T @ xrows
    lam = ridge * np.mean(np.diag(gram))
    a = np.vstack([xrows, np.sqrt(lam) * np.eye(xrows.shape[1])])
    b = np.vstack([yrows, np.zeros((xrows.shape[1], yrows.shape[1]))])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_projected_blocks_match_numpy_lstsq(kind):
    torch.manual_seed(0)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        data = [_correlated(64, 12, 4, seed=s) for s in range(3)]
        target = "2"
    else:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=2),
                            nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).double()
        net(torch.randn(1, 3, 9, 9, dtype=torch.float64))
        data = [torch.randn(4, 3, 9, 9, dtype=torch.float64) for _ in range(2)]
        target = "2"
    sparse, rep = xsurgery.convert(net, compress=2, init="project", calibration=data, ridge=1e-2,
                                   example_inputs=data[0][:1], check=False)
    xl = dict(sparse.named_modules())[target]
    dense = dict(net.named_modules())[target]
    # the dense layer's inputs, captured independently of the projection's hooks
    seen = []
    h = dense.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for b in data:
            net(b)
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]) if kind == "linear" else None
    index = xl.index.view(xl.blocks, xl.degree)
    per = xl.out_features // xl.blocks
    w = dense.weight.detach()
    for g in range(xl.blocks):
        if kind == "linear":
            xrows = x[:, index[g]].numpy()
            yrows = (x @ w.T)[:, g * per:(g + 1) * per].numpy()
        else:
            # independent unfolding: F.unfold (2-D only) with the layer's stride/padding/dilation
            cols = torch.cat([F.unfold(s, dense.kernel_size, dilation=dense.dilation, padding=dense.padding,
                                       stride=dense.stride) for s in seen], 0)  # [N, C*k*k, L]
            cols = torch.cat([c.T for c in cols])  # [rows, C*k*k]
            area = dense.kernel_size[0] * dense.kernel_size[1]
            sel = torch.cat([torch.arange(c * area, (c + 1) * area) for c in index[g].tolist()])
            xrows = cols[:, sel].numpy()
            yrows = (cols @ w.reshape(w.shape[0], -1).T)[:, g * per:(g + 1) * per].numpy()
        want = _block_fit_numpy(xrows, yrows, 1e-2)
        got = xl.weight.detach()[g * per:(g + 1) * per].reshape(per, -1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    # the bias is the dense one
    if dense.bias is not None:
        torch.testing.assert_close(xl.bias, dense.bias)
    # the reported error is the layer's relative output error on the dense inputs, computed directly
    with torch.no_grad():
        ys = torch.cat([dense(s).flatten() for s in seen])
        yx = torch.cat([xl(s).flatten() for s in seen])
    direct = float((yx - ys).norm() / ys.norm())
    row = next(r for r in rep.projection["layers"] if r["name"] == target)
    assert row["project_error"] == pytest.approx(direct, rel=1e-6)
    assert rep.to_dict()["projection"]["layers"][0]["name"] == row["name"]


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
def test_project_error_below_keep_on_correlated_inputs(kind):
    torch.manual_seed(1)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
        z = torch.randn(256, 6)
        data = [torch.relu(z @ torch.randn(6, 32))]
    else:
        dims = int(kind[-2])
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        net = nn.Sequential(conv(3, 32, 1), conv(32, 32, 3, padding=1), nn.ReLU(), conv(32, 5, 1))
        size = {1: (16, 32), 2: (8, 12, 12), 3: (4, 6, 6, 6)}[dims]
        # channels that are mixtures of a few smooth factors: strongly correlated inputs
        data = [torch.randn(size[0], 3, *size[1:])]
        net[0].weight.data = net[0].weight.data[:, :1].expand_as(net[0].weight).clone() + \
            0.05 * torch.randn_like(net[0].weight)
    sparse, rep = xsurgery.convert(net, compress=4, init="project", calibration=data, example_inputs=data[0][:2],
                                   check=False)
    layers = rep.projection["layers"]
    assert layers and all(r["rows"] > 0 for r in layers)
    errs = {r["name"]: (r["keep_error"], r["project_error"]) for r in layers}
    for name, (keep, proj) in errs.items():
        assert proj < keep, (name, keep, proj)
    # the model's output moves less from the dense one than with keep
    keep_model, _ = xsurgery.convert(net, compress=4, init="keep", example_inputs=data[0][:2], check=False)
    with torch.no_grad():
        y = net(data[0])
        d_keep = (keep_model(data[0]) - y).norm()
        d_proj = (sparse(data[0]) - y).norm()
    assert d_proj < d_keep


def test_grouped_convs_stay_dense_and_the_model_runs():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    data = torch.randn(4, 3, 8, 8)
    sparse, rep = xsurgery.convert(net, compress=2, init="project", calibration=data, check=False)
    names = [r["name"] for r in rep.projection["layers"]]
    assert names == [n for n, m in sparse.named_modules() if isinstance(m, X_LAYERS)] == ["2"]
    assert isinstance(sparse[1], nn.Conv2d) and sparse(data).shape == (4, 4, 8, 8)


def test_calibration_defaults_and_mistakes():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.warns(UserWarning, match="example input"):
        _, rep = xsurgery.convert(net, init="project", example_inputs=torch.randn(4, 8))
    assert rep.projection["data"] == "example input" and rep.projection["batches"] == 1
    with pytest.raises(UserError, match="init='project'"):
        xsurgery.convert(net, init="keep", calibration=torch.randn(4, 8))
    with pytest.raises(UserError, match="recipe"):
        xsurgery.convert(net, init="project", calibration="recipes/digits.yaml", example_inputs=torch.randn(4, 8))
    with pytest.raises(UserError, match="no batch"):
        xsurgery.convert(net, init="project", calibration=[], example_inputs=torch.randn(4, 8))
    # a DataLoader's (x, y) batches: the labels are ignored
    loader = [(torch.randn(4, 8), torch.zeros(4)) for _ in range(2)]
    _, rep = xsurgery.convert(net, init="project", calibration=loader, example_inputs=torch.randn(4, 8))
    assert rep.projection["layers"][0]["rows"] == 8
