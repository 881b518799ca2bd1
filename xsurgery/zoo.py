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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "DenseNetBC", "VGGCifar", "densenet_bc_40", "digits_cnn", "vgg16_cifar"]


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


def densenet_bc_40(growth_rate: int = 24, num_classes: int = 10, **kwargs) -> DenseNetBC:
    """DenseNet-BC-40-k (k = ``growth_rate``; the paper uses 24, 36, 48, 60)."""
    return DenseNetBC(depth=40, growth_rate=growth_rate, num_classes=num_classes, **kwargs)


def vgg16_cifar(num_classes: int = 10, **kwargs) -> VGGCifar:
    """VGG16 with batch norm for CIFAR (13 convs, classifier 512-512-classes)."""
    return VGGCifar(VGG16_CFG, num_classes=num_classes, **kwargs)


def digits_cnn(num_classes: int = 10, width: int = 16, in_chans: int = 1, input_size: int = 16) -> nn.Module:
    """Four 3x3 conv-BN-ReLU layers (w, 2w, 2w, 4w; pools after the 1st and 3rd) and a linear classifier."""
    return _DigitsCNN(num_classes, width, in_chans, input_size)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet_bc_40": densenet_bc_40,
    "vgg16_cifar": vgg16_cifar,
    "digits_cnn": digits_cnn,
}
