"""CIFAR DenseNets (Huang et al. 2017) built from pre-activation BN → ReLU → Conv units.

Every convolution but the stem is a ``unit(in_channels, out_channels, kernel_size, role)``,
``role`` one of "bottleneck" (the 1×1 → 4k of a dense layer), "conv3x3" (its 3×3 → k) or
"transition" (the 1×1 compression between blocks). A method substitutes the unit type: selective
convolution swaps whole units, CSG the 3×3 convolution inside them. With compression 1.0 a
transition is average pooling only (the selective-convolution DenseNet-40/100); below 1.0 it is a
unit followed by average pooling (DenseNet-BC).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .registry import register_model


class BnReluConv(nn.Module):
    """The pre-activation unit BN → ReLU → Conv (no conv bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 conv: Callable[..., nn.Module] = nn.Conv2d):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.norm(x)))


def bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int, role: str) -> nn.Module:
    return BnReluConv(in_channels, out_channels, kernel_size)


Unit = Callable[[int, int, int, str], nn.Module]


class DenseLayer(nn.Module):
    """Bottleneck dense layer: x ↦ [x, conv3x3(bottleneck(x))] (channel concatenation)."""

    def __init__(self, in_channels: int, growth: int, unit: Unit):
        super().__init__()
        self.unit1 = unit(in_channels, 4 * growth, 1, "bottleneck")
        self.unit2 = unit(4 * growth, growth, 3, "conv3x3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.unit2(self.unit1(x))], 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, unit: Unit):
        layers = [] if out_channels == in_channels else \
            [unit(in_channels, out_channels, 1, "transition")]
        super().__init__(*layers, nn.AvgPool2d(2))


class PreActNet(nn.Module):
    """Base of the pre-activation CIFAR networks: their features end in a BN → ReLU → global
    pool → fc head, and their convolutions start from He initialisation."""

    def add_head(self, channels: int, num_classes: int) -> None:
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def init_convs(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(features))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarDenseNet(PreActNet):
    """Stem 3×3 conv (2k channels) → 3 dense blocks of (depth−4)/6 bottleneck layers, with
    transitions between them → BN → ReLU → global pool → fc."""

    def __init__(self, depth: int, growth: int, compression: float, num_classes: int = 10,
                 unit: Unit = bn_relu_conv):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"CIFAR DenseNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = 2 * growth
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, growth, unit))
                channels += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                out = int(channels * compression)
                blocks.append(Transition(channels, out, unit))
                channels = out
        self.features = nn.Sequential(*blocks)
        self.add_head(channels, num_classes)
        self.init_convs()
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(self.conv1(x)))


CIFAR_DENSENETS = {
    # name: (depth, growth k, compression)
    "cifar_densenet40": (40, 12, 1.0),
    "cifar_densenet100": (100, 12, 1.0),
    "cifar_densenet_bc_40_36": (40, 36, 0.5),
    "cifar_densenet_bc_40_48": (40, 48, 0.5),
}


def _register(name: str, depth: int, growth: int, compression: float) -> None:
    @register_model(name)
    def build(num_classes: int) -> nn.Module:
        return CifarDenseNet(depth, growth, compression, num_classes)


for _name, _spec in CIFAR_DENSENETS.items():
    _register(_name, *_spec)
