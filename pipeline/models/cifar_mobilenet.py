"""CIFAR MobileNetV2 (Sandler et al. 2018) as the CIFAR literature trains it: stride-1 stem and
first stages (32×32 inputs keep 4×4 maps at the end), ReLU, a 1×1 conv + BN shortcut where a
stride-1 block changes width.

``expansion_conv(in_channels, out_channels)`` is the 1×1 expansion conv of every block, the layer
a method may substitute (e.g. a generated conv); nothing else is substituted.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .registry import register_model

ConvFactory = Callable[[int, int], nn.Module]

# (expansion t, output channels c, blocks n, first stride s); strides of the first two stages
# are 1 for CIFAR (2 on ImageNet).
CIFAR_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv1x1(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
            groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                      groups=groups, bias=False), nn.BatchNorm2d(out_channels)]


class InvertedResidual(nn.Module):
    """1×1 expand → BN-ReLU → 3×3 depthwise (stride) → BN-ReLU → 1×1 project → BN (+ shortcut
    at stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int,
                 expansion_conv: ConvFactory = conv1x1):
        super().__init__()
        hidden = expansion * in_channels
        self.conv1 = expansion_conv(in_channels, hidden)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2, self.bn2 = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.conv3, self.bn3 = conv_bn(hidden, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.shortcut = (nn.Sequential(*conv_bn(in_channels, out_channels))
                         if stride == 1 and in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class CifarMobileNetV2(nn.Module):
    """Stem 3×3 (32) → 17 inverted residual blocks → 1×1 (1280) → pool → fc."""

    def __init__(self, num_classes: int = 10, expansion_conv: ConvFactory = conv1x1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 32, 3)
        self.relu = nn.ReLU(inplace=True)
        blocks, channels = [], 32
        for expansion, out, n, stride in CIFAR_MOBILENET_V2:
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, expansion, stride if i == 0 else 1,
                                               expansion_conv))
                channels = out
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = conv_bn(channels, 1280)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cifar_mobilenet_v2")
def build(num_classes: int) -> nn.Module:
    return CifarMobileNetV2(num_classes)
