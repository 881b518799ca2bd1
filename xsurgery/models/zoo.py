"""Small plain models that torchvision and timm lack: the paper's CIFAR networks.

These are ordinary dense ``nn.Module`` definitions; the surgery (:func:`xsurgery.surgery.convert`)
turns them into X-networks like any other model. Each instance carries
``default_input_size`` (C, H, W) for reports and exports.

* ``densenet_bc_40``: DenseNet-BC (Huang et al., CVPR 2017) of depth 40 for 32x32 inputs:
  a 3x3 stem with 2k channels, three dense blocks of six bottleneck layers
  (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k), transitions with compression 0.5
  (BN-ReLU-1x1 conv, 2x2 average pool), BN-ReLU, global average pool, linear classifier.
* ``vgg16_cifar``: the 13-conv VGG16 with batch norm and a 512-512-classes classifier,
  as in the Deep Expander Networks code (``code/modelDefs/vggcifar.py``).
* ``digits_cnn``: a four-conv network for the 8x8 scikit-learn digits upscaled to 16x16
  (the smoke-run recipe).
* ``fmnist_mobilenet`` / ``fmnist_resnet``: CPU-sized 28x28 networks for the Fashion-MNIST
  experiment (``recipes/fmnist_*.yaml``): depthwise 3x3 + pointwise 1x1 blocks (the paper's
  MobileNet experiment, where the 1x1 convs are made sparse), and basic residual blocks of
  3x3 convs. Every width is a multiple of 64 (32 for the first block) so that compressions up
  to 16 with mixing 2 give exact degrees and block counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "DenseNetBC", "FMNISTMLP", "FMNISTMobileNet", "FMNISTResNet", "VGGCifar", "densenet_bc_40", "digits_cnn",
           "fmnist_mlp", "fmnist_mobilenet", "fmnist_resnet", "vgg16_cifar"]


class _Bottleneck(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k); its output is concatenated to its input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int = 4) -> None:
        super().__init__()
        inner = bottleneck_width * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        return torch.cat([x, out], 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)


class DenseNetBC(nn.Module):
    """DenseNet-BC for CIFAR-sized inputs.

    Args:
        depth: total depth L; (L - 4) must be divisible by 6 (three blocks of bottleneck pairs).
        growth_rate: k, channels added by every bottleneck layer.
        compression: transition compression theta (0.5 in DenseNet-BC).
        num_classes: classifier outputs.
        bottleneck_width: 1x1 conv width as a multiple of k (4 in the paper).
    """

    def __init__(
        self,
        depth: int = 40,
        growth_rate: int = 24,
        compression: float = 0.5,
        num_classes: int = 10,
        bottleneck_width: int = 4,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 (e.g. 40, 100), got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        per_block = (depth - 4) // 6
        channels = 2 * growth_rate
        self.stem = nn.Conv2d(in_chans, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for b in range(3):
            block = nn.Sequential()
            for i in range(per_block):
                block.add_module(f"layer{i + 1}", _Bottleneck(channels, growth_rate, bottleneck_width))
                channels += growth_rate
            stages.append(block)
            if b < 2:
                out = int(math.floor(channels * compression))
                stages.append(_Transition(channels, out))
                channels = out
        self.features = nn.Sequential(
            *stages, nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.default_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.stem(x)))


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGCifar(nn.Module):
    """VGG with batch norm for 32x32 inputs: conv3x3-BN-ReLU stacks, five max pools, a small MLP.

    Args:
        cfg: channel counts and ``"M"`` (2x2 max pool), as torchvision's VGG configs.
        num_classes: classifier outputs.
        hidden: width of the hidden classifier layer.
    """

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10, hidden: int = 512, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )
        self.default_input_size = (in_chans, 32, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, in_chans: int = 1, input_size: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        # the stem runs at full resolution and the rest at 1/2 and 1/4: cheap enough for CPU tests
        self.features = nn.Sequential(
            *block(in_chans, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, num_classes)
        self.default_input_size = (in_chans, input_size, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _he_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


FMNIST_MOBILENET_CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1))


class FMNISTMobileNet(nn.Module):
    """MobileNet-v1-style network for 28x28 images.

    A 3x3 stride-2 stem (dense; 14x14 from there on, which keeps training on CPU cheap), then
    blocks of depthwise 3x3 (BN-ReLU) + pointwise 1x1 (BN-ReLU), global average pool and a
    linear classifier. The depthwise convs are never converted by the surgery; the 1x1 convs
    hold almost all the parameters and MACs, as in MobileNet.

    Args:
        num_classes: classifier outputs.
        width: channels of the stem; the blocks use ``cfg`` scaled by ``width / 32``.
        in_chans: image channels.
        cfg: ``(out_channels, stride)`` of each depthwise-separable block (at ``width=32``).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_chans: int = 1,
                 cfg=FMNIST_MOBILENET_CFG, input_size: int = 28) -> None:
        super().__init__()
        scale = width / 32
        layers = _conv_bn(in_chans, width, 3, stride=2)
        c = width
        for out, stride in cfg:
            out = int(out * scale)
            layers += _conv_bn(c, c, 3, stride=stride, groups=c)  # depthwise
            layers += _conv_bn(c, out, 1)  # pointwise
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)
        self.default_input_size = (in_chans, input_size, input_size)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), *_conv_bn(cout, cout, 3, relu=False))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride, relu=False)) \
            if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class FMNISTResNet(nn.Module):
    """ResNet-style network of 3x3 convs for 28x28 images.

    A 3x3 stride-2 stem (dense) to 14x14, three stages of one basic block each
    (``width``, ``2 * width``, ``4 * width`` channels; stride 1, 2, 2), global average pool,
    linear classifier. Zero-init of each block's last BN is *not* used: every variant gets
    the same plain He initialisation.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_chans: int = 1, input_size: int = 28) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_chans, width, 3, stride=2))
        self.stages = nn.Sequential(_BasicBlock(width, width, 1), _BasicBlock(width, 2 * width, 2),
                                    _BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)
        self.default_input_size = (in_chans, input_size, input_size)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.stages(self.stem(x))))


def densenet_bc_40(growth_rate: int = 24, num_classes: int = 10, **kwargs) -> DenseNetBC:
    """DenseNet-BC-40-k (k = ``growth_rate``; the paper uses 24, 36, 48, 60)."""
    return DenseNetBC(depth=40, growth_rate=growth_rate, num_classes=num_classes, **kwargs)


def vgg16_cifar(num_classes: int = 10, **kwargs) -> VGGCifar:
    """VGG16 with batch norm for CIFAR (13 convs, classifier 512-512-classes)."""
    return VGGCifar(VGG16_CFG, num_classes=num_classes, **kwargs)


def digits_cnn(num_classes: int = 10, width: int = 16, in_chans: int = 1, input_size: int = 16) -> nn.Module:
    """Four 3x3 conv-BN-ReLU layers (w, 2w, 2w, 4w; pools after the 1st and 3rd) and a linear classifier."""
    return _DigitsCNN(num_classes, width, in_chans, input_size)


def fmnist_mobilenet(num_classes: int = 10, width: int = 32, in_chans: int = 1, input_size: int = 28) -> nn.Module:
    """MobileNet-style depthwise-separable network for 28x28 Fashion-MNIST (see :class:`FMNISTMobileNet`)."""
    return FMNISTMobileNet(num_classes, width, in_chans, input_size=input_size)


def fmnist_resnet(num_classes: int = 10, width: int = 32, in_chans: int = 1, input_size: int = 28) -> nn.Module:
    """ResNet-style network of 3x3 convs for 28x28 Fashion-MNIST (see :class:`FMNISTResNet`)."""
    return FMNISTResNet(num_classes, width, in_chans, input_size)


class FMNISTMLP(nn.Sequential):
    """An MLP on the flattened pixels: ``depth`` Linear-BatchNorm-ReLU layers of ``width`` units,
    then a linear classifier (the first layer reads the raw input: the stem)."""

    def __init__(self, num_classes: int = 10, width: int = 1024, depth: int = 3, in_chans: int = 1,
                 input_size: int = 28) -> None:
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_chans * input_size * input_size
        for _ in range(depth):
            layers += [nn.Linear(cin, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            cin = width
        super().__init__(*layers, nn.Linear(cin, num_classes))
        self.default_input_size = (in_chans, input_size, input_size)


def fmnist_mlp(num_classes: int = 10, width: int = 1024, depth: int = 3, in_chans: int = 1,
               input_size: int = 28) -> nn.Module:
    """MLP for 28x28 Fashion-MNIST (see :class:`FMNISTMLP`)."""
    return FMNISTMLP(num_classes, width, depth, in_chans, input_size)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet_bc_40": densenet_bc_40,
    "vgg16_cifar": vgg16_cifar,
    "digits_cnn": digits_cnn,
    "fmnist_mobilenet": fmnist_mobilenet,
    "fmnist_resnet": fmnist_resnet,
    "fmnist_mlp": fmnist_mlp,
}
