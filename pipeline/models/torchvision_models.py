"""ImageNet architectures, as torchvision defines them (randomly initialised: no weights are
downloaded)."""
from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from .registry import register_model

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101",
                     "mobilenet_v2", "shufflenet_v2_x1_0", "densenet121", "densenet169")


def _register(arch: str) -> None:
    @register_model(arch)
    def build(num_classes: int) -> nn.Module:
        return getattr(tvm, arch)(weights=None, num_classes=num_classes)


for _arch in TORCHVISION_ARCHS:
    _register(_arch)
