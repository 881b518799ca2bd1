import math

import pytest
import torch
from torch import nn

from xsurgery.layers import XConv2d
from xsurgery.models.zoo import MODELS, densenet_bc_40, vgg16_cifar
from xsurgery.surgery import convert


def densenet_bc_params(depth: int, k: int, classes: int, theta: float = 0.5) -> int:
    """DenseNet-BC parameter count from the architecture's definition (Huang et al. 2017)."""
    n = (depth - 4) // 6
    c = 2 * k
    total = 3 * c * 9  # 3x3 stem, no bias
    for block in range(3):
        for _ in range(n):
            total += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * k * 9  # BN, 1x1 to 4k, BN, 3x3 to k
            c += k
        if block < 2:
            out = math.floor(theta * c)
            total += 2 * c + c * out  # BN, 1x1 transition
            c = out
    return total + 2 * c + c * classes + classes  # final BN, classifier


def vgg16_params(classes: int) -> int:
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, c = 0, 3
    for v in cfg:
        total += c * v * 9 + v + 2 * v  # conv + bias, BN
        c = v
    return total + 512 * 512 + 512 + 512 * classes + classes


@pytest.mark.parametrize("k", [24, 36, 48, 60])
@pytest.mark.parametrize("classes", [10, 100])
def test_densenet_bc_40_param_count(k, classes):
    model = densenet_bc_40(growth_rate=k, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == densenet_bc_params(40, k, classes)


def test_densenet_bc_40_24_is_about_0_69m():
    # the formula gives 690,346 for k=24 on CIFAR-10 (not 0.19M)
    assert densenet_bc_params(40, 24, 10) == 690_346
    convs = [m for m in densenet_bc_40().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 6 * 2 + 2  # stem, bottleneck pairs, transitions: depth 40 with the fc


def test_vgg16_cifar_param_count():
    model = vgg16_cifar(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == vgg16_params(10)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_default_input_size(name):
    model = MODELS[name](num_classes=7)
    c, h, w = model.default_input_size
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, c, h, w)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(n for n in MODELS if n != "fmnist_mlp"))  # the convnets
def test_surgery_converts_zoo_models_like_any_model(name):
    model = MODELS[name]()
    assert not any(isinstance(m, XConv2d) for m in model.modules())  # plain definitions
    x_model, _ = convert(name, compress=2)
    xs = [m for m in x_model.modules() if isinstance(m, XConv2d)]
    # depthwise/grouped convs are never converted (MobileNet's)
    dense_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert len(xs) == len(dense_convs) - 1  # all but the stem
    assert type(x_model) is type(model)
    c, h, w = model.default_input_size
    x_model.train()
    out = x_model(torch.randn(2, c, h, w))
    out.sum().backward()
    assert all(m.weight.grad is not None for m in xs)


def test_densenet_depth_must_be_6n_plus_4():
    from xsurgery.models.zoo import DenseNetBC

    with pytest.raises(ValueError, match="6n \\+ 4"):
        DenseNetBC(depth=41)


def test_fashion_mnist_nets_structure_and_parameter_counts():
    from xsurgery.models.zoo import fmnist_mobilenet, fmnist_resnet

    m = fmnist_mobilenet(width=32)
    # stem conv+BN, then per block: depthwise 3x3 + BN, pointwise 1x1 + BN; classifier
    chans = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    expect = 9 * 32 + 2 * 32 + sum(9 * a + 2 * a + a * b + 2 * b for a, b in chans) + 256 * 10 + 10
    assert sum(p.numel() for p in m.parameters()) == expect
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert sum(c.groups == c.in_channels > 1 for c in convs) == 5 and sum(c.kernel_size == (1, 1) for c in convs) == 5
    r = fmnist_resnet(width=16)
    convs = [c for c in r.modules() if isinstance(c, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 7 and sum(c.kernel_size == (1, 1) for c in convs) == 2
    for net in (m, r):
        assert net.default_input_size == (1, 28, 28)
        assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_fmnist_mlp_converts_from_its_image_size():
    import torch

    import xsurgery
    from xsurgery.models.zoo import fmnist_mlp

    mlp = fmnist_mlp(width=64, depth=2)
    assert mlp(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    _, rep = xsurgery.convert(mlp, compress=4, input_size=(1, 28, 28), exclude=["1"])  # a sample the MLP flattens
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    assert rows["4"]["degree"] == 16 and not rows["1"].get("degree")
    assert rep.totals["macs_before"] == 784 * 64 + 64 * 64 + 64 * 10
