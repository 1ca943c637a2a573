"""The architectures of selective convolution (Jeong & Shin 2019), baseline and selective.

CIFAR pre-activation ResNet-164 and ResNeXt-29 (8×64d) as the authors define them: a 3×3 stem
without BN, three stages of bottleneck blocks of BN → ReLU → Conv units, AvgPool2d(2) between
stages, identity shortcuts zero-padded at the end when a block widens, and BN → ReLU → global
pool → fc. Every unit the method may replace is a ``unit(in_channels, out_channels, kernel_size,
role)``; the selective builders pass SConv units with K per role:

    ResNet-164   reduce 1×1 → K=3,  conv3x3 → K=0,  expand 1×1 → K=3
    ResNeXt-29   reduce 1×1 → K=3,  grouped 3×3 stays plain,  expand 1×1 → K=3
    DenseNet     bottleneck 1×1 → K=3,  conv3x3 → K=0,  transition 1×1 → K=3

A K = 0 unit is registered right after the unit that produces its whole input, which is what
``selectconv.pruning_pairs`` relies on at export. torchvision DenseNet-121/169 are converted
layer by layer, keeping torchvision's initial weights.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torchvision.models as tvm
from torch import nn

from ..methods.selectconv import SelectiveConv2d
from .cifar_densenet import (CIFAR_DENSENETS, BnReluConv, CifarDenseNet, PreActNet,
                             bn_relu_conv)
from .cifar_resnet import zero_pad_channels
from .registry import register_model

Unit = Callable[[int, int, int, str], nn.Module]

# K of the selective unit replacing each role; roles missing here stay plain.
SELECTIVE_K = {"bottleneck": 3, "transition": 3, "reduce": 3, "expand": 3, "conv3x3": 0}


def selective_unit(in_channels: int, out_channels: int, kernel_size: int,
                   role: str) -> nn.Module:
    return SelectiveConv2d(in_channels, out_channels, kernel_size, K=SELECTIVE_K[role])


class PreActBottleneck(nn.Module):
    """x + unit3(unit2(unit1(x))): 1×1 reduce → 3×3 → 1×1 expand (×4)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, unit: Unit):
        super().__init__()
        self.out_channels = planes * self.expansion
        self.unit1 = unit(in_channels, planes, 1, "reduce")
        self.unit2 = unit(planes, planes, 3, "conv3x3")
        self.unit3 = unit(planes, self.out_channels, 1, "expand")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_pad_channels(x, self.out_channels) + self.unit3(self.unit2(self.unit1(x)))


class ResNeXtBlock(nn.Module):
    """x + unit3(grouped(unit1(x))): 1×1 reduce → grouped 3×3 → 1×1 expand."""

    def __init__(self, in_channels: int, out_channels: int, width: int, groups: int,
                 unit: Unit):
        super().__init__()
        self.out_channels = out_channels
        self.unit1 = unit(in_channels, width, 1, "reduce")
        self.grouped = BnReluConv(width, width, 3, conv=partial(nn.Conv2d, groups=groups))
        self.unit3 = unit(width, out_channels, 1, "expand")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_pad_channels(x, self.out_channels) + self.unit3(self.grouped(self.unit1(x)))


class CifarPreActNet(PreActNet):
    """Stem 3×3 conv → stages (AvgPool2d(2) between) → BN → ReLU → global pool → fc."""

    def __init__(self, stem_channels: int, stages: list[nn.Sequential], channels: int,
                 num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem_channels, 3, padding=1, bias=False)]
        for i, stage in enumerate(stages):
            layers += [stage] if i == 0 else [nn.AvgPool2d(2), stage]
        self.features = nn.Sequential(*layers)
        self.add_head(channels, num_classes)
        self.init_convs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def cifar_preact_resnet(depth: int, num_classes: int, unit: Unit) -> CifarPreActNet:
    """Pre-activation bottleneck ResNet of depth 9n+2 (164: n = 18), widths 16/32/64 (×4)."""
    if (depth - 2) % 9:
        raise ValueError(f"CIFAR pre-activation ResNet depth must be 9n+2, got {depth}")
    n = (depth - 2) // 9
    channels, stages = 16, []
    for planes in (16, 32, 64):
        blocks = []
        for _ in range(n):
            blocks.append(PreActBottleneck(channels, planes, unit))
            channels = planes * PreActBottleneck.expansion
        stages.append(nn.Sequential(*blocks))
    return CifarPreActNet(16, stages, channels, num_classes)


def cifar_resnext(depth: int, groups: int, group_width: int, num_classes: int,
                  unit: Unit, widen: int = 4) -> CifarPreActNet:
    """ResNeXt of depth 9n+2 (29: n = 3): stage outputs 64·widen·(1, 2, 4), bottleneck width
    groups·group_width·(1, 2, 4)."""
    if (depth - 2) % 9:
        raise ValueError(f"CIFAR ResNeXt depth must be 9n+2, got {depth}")
    n = (depth - 2) // 9
    channels, stages = 64, []
    for scale in (1, 2, 4):
        out, width = 64 * widen * scale, groups * group_width * scale
        blocks = []
        for _ in range(n):
            blocks.append(ResNeXtBlock(channels, out, width, groups, unit))
            channels = out
        stages.append(nn.Sequential(*blocks))
    return CifarPreActNet(64, stages, channels, num_classes)


@register_model("cifar_resnet164")
def cifar_resnet164(num_classes: int) -> nn.Module:
    return cifar_preact_resnet(164, num_classes, bn_relu_conv)


@register_model("cifar_resnet164", method="selectconv")
def cifar_resnet164_selectconv(num_classes: int) -> nn.Module:
    return cifar_preact_resnet(164, num_classes, selective_unit)


@register_model("cifar_resnext29_8x64d")
def cifar_resnext29_8x64d(num_classes: int) -> nn.Module:
    return cifar_resnext(29, 8, 64, num_classes, bn_relu_conv)


@register_model("cifar_resnext29_8x64d", method="selectconv")
def cifar_resnext29_8x64d_selectconv(num_classes: int) -> nn.Module:
    return cifar_resnext(29, 8, 64, num_classes, selective_unit)


# A DenseNet small enough for quick runs on the embedded digits (2 bottleneck layers a block).
SMALL_DENSENET = ("cifar_densenet16", (16, 12, 1.0))


@register_model(SMALL_DENSENET[0])
def cifar_densenet16(num_classes: int) -> nn.Module:
    return CifarDenseNet(*SMALL_DENSENET[1], num_classes)


def _register_densenet(name: str, depth: int, growth: int, compression: float) -> None:
    @register_model(name, method="selectconv")
    def build(num_classes: int) -> nn.Module:
        return CifarDenseNet(depth, growth, compression, num_classes, unit=selective_unit)


for _name in ("cifar_densenet40", "cifar_densenet100"):
    _register_densenet(_name, *CIFAR_DENSENETS[_name])
_register_densenet(SMALL_DENSENET[0], *SMALL_DENSENET[1])


# --- torchvision DenseNets ------------------------------------------------------------------

def selective_from(norm: nn.BatchNorm2d, conv: nn.Conv2d, K: int) -> SelectiveConv2d:
    """A selective unit holding the weights of an existing BN → ReLU → Conv."""
    unit = SelectiveConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], K=K,
                           stride=conv.stride[0])
    unit.norm.load_state_dict(norm.state_dict())
    unit.conv.weight.data.copy_(conv.weight.data)
    return unit


class SelectiveDenseLayer(nn.Module):
    """torchvision's dense layer (it takes the list of previous features) with SConv units."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if layer.drop_rate:
            raise ValueError("selectconv densenet: drop_rate must be 0")
        self.unit1 = selective_from(layer.norm1, layer.conv1, SELECTIVE_K["bottleneck"])
        self.unit2 = selective_from(layer.norm2, layer.conv2, SELECTIVE_K["conv3x3"])

    def forward(self, features: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, 1) if isinstance(features, list) else features
        return self.unit2(self.unit1(x))


def selective_torchvision_densenet(arch: str, num_classes: int) -> nn.Module:
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    for name, module in list(model.features.named_children()):
        if isinstance(module, tvm.densenet._DenseBlock):
            for layer_name, layer in list(module.items()):
                module[layer_name] = SelectiveDenseLayer(layer)
        elif isinstance(module, tvm.densenet._Transition):
            unit = selective_from(module.norm, module.conv, SELECTIVE_K["transition"])
            setattr(model.features, name, nn.Sequential(unit, module.pool))
    return model


def _register_torchvision(arch: str) -> None:
    @register_model(arch, method="selectconv")
    def build(num_classes: int) -> nn.Module:
        return selective_torchvision_densenet(arch, num_classes)


for _arch in ("densenet121", "densenet169"):
    _register_torchvision(_arch)
