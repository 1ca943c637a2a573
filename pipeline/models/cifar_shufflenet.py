"""CIFAR ShuffleNetV2 (Ma et al. 2018) as the CIFAR literature trains it: stride-1 3×3 stem (24),
no max-pool, three stages of one down-sampling unit followed by n basic units, final 1×1 conv.

``final_conv(in_channels, out_channels)`` is the final 1×1 conv (192 → 1024 at 0.5×), the layer
a method may substitute (e.g. a generated conv).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .cifar_mobilenet import conv1x1, conv_bn
from .registry import register_model

ConvFactory = Callable[[int, int], nn.Module]

# width multiplier: (stage output channels, final conv channels); units per stage: 3, 7, 3
CIFAR_SHUFFLENET_V2 = {0.5: ((48, 96, 192), 1024)}
UNITS = (3, 7, 3)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicUnit(nn.Module):
    """Split channels in halves; the second half goes 1×1 → BN-ReLU → 3×3 dw → BN → 1×1 →
    BN-ReLU; concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(*conv_bn(half, half), nn.ReLU(inplace=True),
                                    *conv_bn(half, half, 3, groups=half),
                                    *conv_bn(half, half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([left, self.branch(right)], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches on the whole input, each giving half the output channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(*conv_bn(in_channels, in_channels, 3, 2, groups=in_channels),
                                  *conv_bn(in_channels, mid), nn.ReLU(inplace=True))
        self.right = nn.Sequential(*conv_bn(in_channels, mid), nn.ReLU(inplace=True),
                                   *conv_bn(mid, mid, 3, 2, groups=mid),
                                   *conv_bn(mid, mid), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class CifarShuffleNetV2(nn.Module):
    def __init__(self, width: float = 0.5, num_classes: int = 10,
                 final_conv: ConvFactory = conv1x1):
        super().__init__()
        if width not in CIFAR_SHUFFLENET_V2:
            raise ValueError(f"ShuffleNetV2 width must be one of {sorted(CIFAR_SHUFFLENET_V2)}, "
                             f"got {width}")
        stages, final = CIFAR_SHUFFLENET_V2[width]
        self.conv1, self.bn1 = conv_bn(3, 24, 3)
        self.relu = nn.ReLU(inplace=True)
        layers, channels = [], 24
        for out, units in zip(stages, UNITS):
            layers.append(nn.Sequential(DownUnit(channels, out),
                                        *(BasicUnit(out) for _ in range(units))))
            channels = out
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = final_conv(channels, final)
        self.bn2 = nn.BatchNorm2d(final)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(final, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cifar_shufflenet_v2_x0_5")
def build(num_classes: int) -> nn.Module:
    return CifarShuffleNetV2(0.5, num_classes)
