"""CIFAR ResNets (He et al. 2016, §4.2): 6n+2 layers, widths 16/32/64, option-A shortcuts.

Blocks use torchvision's attribute names (conv1, bn1, relu, conv2, bn2, downsample) so that a
method converting torchvision ResNets converts these too. The shortcut that changes shape is
parameter-free (option A): subsample by 2, then the new channels appended after x as zeros,
[x, 0]. That is the placement of every reference that has option A: He et al.'s Torch ResNets
(fb.resnet.torch: Concat(Identity, MulConstant(0))), the CSG authors' CIFAR ResNets
(``DownsampleA``: cat(x, x·0)) and the selective-convolution ResNet-164 (cat(x, zeros)); the
[0, x, 0] split of some re-implementations matches none of them, so a model with the same
weights would compute other logits from the first widening block on.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

ConvFactory = Callable[..., nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def zero_pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The identity of a widening block: x, then channels − C zero channels appended, [x, 0]."""
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: stride subsampling, then the new channels appended as zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_pad_channels(x[:, :, :: self.stride, :: self.stride], self.out_channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, conv: ConvFactory = conv3x3):
        super().__init__()
        self.conv1 = conv(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (ZeroPadShortcut(inplanes, planes, stride)
                           if stride != 1 or inplanes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """conv3x3(16) → 3 stages of n blocks (16, 32, 64 channels; stride 1, 2, 2) → pool → fc.

    ``block`` and ``conv`` are the layer types a method may substitute (e.g. a gated block, a
    generated 3×3 conv); the stem conv and the classifier are never substituted.
    """

    def __init__(self, depth: int, num_classes: int = 10, block: type[nn.Module] = BasicBlock,
                 conv: ConvFactory = conv3x3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._make_layer(block, conv, 16, n, 1)
        self.layer2 = self._make_layer(block, conv, 32, n, 2)
        self.layer3 = self._make_layer(block, conv, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, conv, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self.inplanes, planes, stride if i == 0 else 1, conv=conv))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _register(depth: int) -> None:
    @register_model(f"cifar_resnet{depth}")
    def build(num_classes: int) -> nn.Module:
        return CifarResNet(depth, num_classes)


CIFAR_RESNET_DEPTHS = (8, 20, 32, 44, 56, 110)  # 8: a tiny net for smoke tests

for _depth in CIFAR_RESNET_DEPTHS:
    _register(_depth)
