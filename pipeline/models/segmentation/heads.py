"""Decode heads, as mmsegmentation's ``ASPPHead``, ``PSPHead`` and ``FCNHead`` (its DeepLabV3
and PSPNet configs): every conv is conv (no bias) → BN → ReLU, and a head ends in
Dropout2d → 1×1 classifier (with bias) at the feature resolution.

**ASPP** (DeepLabV3), on layer4's features: an image-pooling branch (global average pool → 1×1,
upsampled back), a 1×1 branch and three 3×3 atrous branches at rates 12/24/36 for output
stride 8 (6/12/18 for 16); the five outputs are concatenated and fused by a 3×3 conv
(mmseg's ``bottleneck``; torchvision fuses with a 1×1 and adds a 3×3 after it).
**Pyramid pooling** (PSPNet): average pools to 1×1, 2×2, 3×3 and 6×6 bins → 1×1 conv each,
upsampled and concatenated with the input features, fused by a 3×3 conv.
**FCN** (the auxiliary head, on layer3's features): one 3×3 conv.

Widths (mmseg): ``channels`` 512 for ResNet-50/101 and 128 for ResNet-18, the auxiliary head
half of it; dropout 0.1. Upsampling is bilinear with ``align_corners=False``. The pooled
branches hold BatchNorm on 1×1 maps, so a training batch needs at least 2 images per rank.
Initialisation (mmseg): Kaiming-normal (fan-out) convs, BN 1 / 0, classifier N(0, 0.01²).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# output stride: the ASPP atrous rates
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
PSP_SCALES = (1, 2, 3, 6)

ConvFactory = Callable[..., nn.Module]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1,
                 conv: ConvFactory = nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv(in_channels, out_channels, kernel_size,
                              padding=dilation * (kernel_size // 2), dilation=dilation,
                              bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling; ``atrous_conv`` builds the three 3×3 atrous convs (a
    method may substitute its own, e.g. generated convs)."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int],
                 atrous_conv: ConvFactory = nn.Conv2d):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        conv_bn_relu(in_channels, channels))
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels)]
            + [conv_bn_relu(in_channels, channels, 3, rate, conv=atrous_conv) for rate in rates])
        self.bottleneck = conv_bn_relu((len(rates) + 2) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [resize(self.image_pool(x), x.shape[-2:])]
        outs += [branch(x) for branch in self.branches]
        return self.bottleneck(torch.cat(outs, 1))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module followed by the 3×3 fusion conv."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = PSP_SCALES):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale),
                                                  conv_bn_relu(in_channels, channels))
                                    for scale in scales)
        self.bottleneck = conv_bn_relu(in_channels + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat(outs, 1))


class DecodeHead(nn.Sequential):
    """context (ASPP, pyramid pooling or one conv) → Dropout2d → 1×1 classifier."""

    def __init__(self, context: nn.Module, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.context = context
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)


def aspp_head(in_channels: int, channels: int, num_classes: int, output_stride: int,
              dropout: float, atrous_conv: ConvFactory = nn.Conv2d) -> DecodeHead:
    return DecodeHead(ASPP(in_channels, channels, ASPP_RATES[output_stride], atrous_conv),
                      channels, num_classes, dropout)


def psp_head(in_channels: int, channels: int, num_classes: int, dropout: float) -> DecodeHead:
    return DecodeHead(PyramidPooling(in_channels, channels), channels, num_classes, dropout)


def fcn_head(in_channels: int, channels: int, num_classes: int, dropout: float) -> DecodeHead:
    return DecodeHead(conv_bn_relu(in_channels, channels, 3), channels, num_classes, dropout)
