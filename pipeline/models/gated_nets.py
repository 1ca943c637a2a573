"""Gated ResNets (method "gated"): every residual block gated, shortcuts never.

Basic blocks (torchvision ResNet-18/34, CIFAR ResNet-20/32/56) gate conv1's output channels,
so per image the closed channels cost nothing in conv1 (outputs) and conv2 (inputs).
Bottlenecks (ResNet-50/101) gate the first 1×1's output and, with ``gate_3x3: true``, the 3×3's
output too. Each gate reads the block input (``pipeline.methods.gating.ChannelGate``).

Structural options (``model.opts``): ``gate_hidden`` (gate FC width, 16) and, for bottleneck
ResNets only, ``gate_3x3``.
"""
from __future__ import annotations

from functools import partial

import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck
from torch import nn

from pipeline.config import ConfigError

from ..methods.gating import GatedResidualBlock
from . import cifar_resnet
from .registry import register_model


class GatedCifarBasicBlock(GatedResidualBlock, cifar_resnet.BasicBlock):
    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 conv=cifar_resnet.conv3x3, gate_hidden: int = 16):
        cifar_resnet.BasicBlock.__init__(self, inplanes, planes, stride, conv=conv)
        self.add_gates(inplanes, [0], gate_hidden)


class GatedBasicBlock(GatedResidualBlock, BasicBlock):
    def __init__(self, inplanes: int, planes: int, *args, gate_hidden: int = 16, **kwargs):
        BasicBlock.__init__(self, inplanes, planes, *args, **kwargs)
        self.add_gates(inplanes, [0], gate_hidden)


class GatedBottleneck(GatedResidualBlock, Bottleneck):
    stage_names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, *args, gate_hidden: int = 16,
                 gate_3x3: bool = False, **kwargs):
        Bottleneck.__init__(self, inplanes, planes, *args, **kwargs)
        self.add_gates(inplanes, [0, 1] if gate_3x3 else [0], gate_hidden)


def _block_type(block: type[nn.Module], **opts) -> partial:
    """``block`` with its gate options bound; keeps ``expansion`` for torchvision's ResNet."""
    bound = partial(block, **opts)
    bound.expansion = block.expansion
    return bound


def _check_hidden(gate_hidden: int) -> None:
    if not isinstance(gate_hidden, int) or gate_hidden < 1:
        raise ConfigError(f"model.opts.gate_hidden: expected a positive integer, "
                         f"got {gate_hidden!r}")


def _register_cifar(depth: int) -> None:
    @register_model(f"cifar_resnet{depth}", method="gated")
    def build(num_classes: int, gate_hidden: int = 16) -> nn.Module:
        _check_hidden(gate_hidden)
        block = _block_type(GatedCifarBasicBlock, gate_hidden=gate_hidden)
        return cifar_resnet.CifarResNet(depth, num_classes, block=block)


def _register_basic(arch: str, layers: list[int]) -> None:
    @register_model(arch, method="gated")
    def build(num_classes: int, gate_hidden: int = 16) -> nn.Module:
        _check_hidden(gate_hidden)
        block = _block_type(GatedBasicBlock, gate_hidden=gate_hidden)
        return tvm.ResNet(block, layers, num_classes=num_classes)


def _register_bottleneck(arch: str, layers: list[int]) -> None:
    @register_model(arch, method="gated")
    def build(num_classes: int, gate_hidden: int = 16, gate_3x3: bool = False) -> nn.Module:
        _check_hidden(gate_hidden)
        if not isinstance(gate_3x3, bool):
            raise ConfigError(f"model.opts.gate_3x3: expected true or false, got {gate_3x3!r}")
        block = _block_type(GatedBottleneck, gate_hidden=gate_hidden, gate_3x3=gate_3x3)
        return tvm.ResNet(block, layers, num_classes=num_classes)


for _depth in (8, 20, 32, 56):  # 8: a tiny net for tests
    _register_cifar(_depth)
_register_basic("resnet18", [2, 2, 2, 2])
_register_basic("resnet34", [3, 4, 6, 3])
_register_bottleneck("resnet50", [3, 4, 6, 3])
_register_bottleneck("resnet101", [3, 4, 23, 3])
