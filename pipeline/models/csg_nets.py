"""``--method csg``: the reference choice of generated convs per architecture.

CIFAR ResNets: both 3×3 convs of every block; CIFAR DenseNet-BC-40-k: the 3×3 of each bottleneck
dense layer; CIFAR MobileNetV2: the 1×1 expansion conv of each block; CIFAR ShuffleNetV2 0.5×: the
final 1×1 (192 → 1024); ImageNet ResNet-50/101: the 3×3 of each bottleneck; ImageNet ResNet-18:
the first 3×3 of each basic block. Never the stem conv, never a classifier.

Structural options (``model.opts``): ``slice`` S and ``code`` C of the [S,S,k,k]-C CSG, and
``binary`` (frozen ±0.5 CSG). The defaults are the reference configuration of each architecture
(``REFERENCE_CSG``): [12,12,3,3]-72 for ResNet-56 and the DenseNets, [16,16,3,3]-128 for the other
ResNets, [16,16,1,1]-16 for MobileNetV2 and ShuffleNetV2; k is the generated convs' kernel size.
"""
from __future__ import annotations

from functools import partial

import torchvision.models as tvm
from torch import nn

from pipeline.config import ConfigError

from ..methods.csg import ConvSliceGenerator, GeneratedConv2d, attach_generator
from .cifar_densenet import CIFAR_DENSENETS, BnReluConv, CifarDenseNet, bn_relu_conv
from .cifar_mobilenet import CifarMobileNetV2
from .cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet
from .cifar_shufflenet import CifarShuffleNetV2
from .registry import register_model

# architecture: (slice S, code C) of the authors' configuration for it
REFERENCE_CSG = {
    "cifar_resnet8": (16, 128), "cifar_resnet20": (16, 128), "cifar_resnet32": (16, 128),
    "cifar_resnet44": (16, 128), "cifar_resnet56": (12, 72), "cifar_resnet110": (16, 128),
    "cifar_densenet_bc_40_36": (12, 72), "cifar_densenet_bc_40_48": (12, 72),
    "cifar_mobilenet_v2": (16, 16), "cifar_shufflenet_v2_x0_5": (16, 16),
    "resnet18": (16, 128), "resnet50": (16, 128), "resnet101": (16, 128),
}


def make_generator(arch: str, kernel_size: int, slice: int | None, code: int | None,
                   binary: bool) -> ConvSliceGenerator:
    if not isinstance(binary, bool):
        raise ConfigError(f"model option 'binary' must be true or false, got {binary!r}")
    default_slice, default_code = REFERENCE_CSG[arch]
    return ConvSliceGenerator(default_slice if slice is None else slice, kernel_size,
                              default_code if code is None else code)


def generated_like(conv: nn.Conv2d, generator: ConvSliceGenerator) -> GeneratedConv2d:
    return GeneratedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                           generator=generator)


def _register_cifar_resnet(arch: str, depth: int) -> None:
    @register_model(arch, method="csg")
    def build(num_classes: int, slice: int | None = None, code: int | None = None,
              binary: bool = False) -> nn.Module:
        csg = make_generator(arch, 3, slice, code, binary)

        def conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
            return GeneratedConv2d(in_channels, out_channels, 3, stride, 1, generator=csg)

        return attach_generator(CifarResNet(depth, num_classes, conv=conv), csg, binary)


def _register_cifar_densenet(arch: str, depth: int, growth: int, compression: float) -> None:
    @register_model(arch, method="csg")
    def build(num_classes: int, slice: int | None = None, code: int | None = None,
              binary: bool = False) -> nn.Module:
        csg = make_generator(arch, 3, slice, code, binary)

        def unit(in_channels: int, out_channels: int, kernel_size: int, role: str) -> nn.Module:
            if role == "conv3x3":
                return BnReluConv(in_channels, out_channels, kernel_size,
                                  conv=partial(GeneratedConv2d, generator=csg))
            return bn_relu_conv(in_channels, out_channels, kernel_size, role)

        model = CifarDenseNet(depth, growth, compression, num_classes, unit=unit)
        return attach_generator(model, csg, binary)


@register_model("cifar_mobilenet_v2", method="csg")
def build_mobilenet_v2(num_classes: int, slice: int | None = None, code: int | None = None,
                       binary: bool = False) -> nn.Module:
    csg = make_generator("cifar_mobilenet_v2", 1, slice, code, binary)
    model = CifarMobileNetV2(num_classes, expansion_conv=partial(_conv1x1, generator=csg))
    return attach_generator(model, csg, binary)


@register_model("cifar_shufflenet_v2_x0_5", method="csg")
def build_shufflenet_v2(num_classes: int, slice: int | None = None, code: int | None = None,
                        binary: bool = False) -> nn.Module:
    csg = make_generator("cifar_shufflenet_v2_x0_5", 1, slice, code, binary)
    model = CifarShuffleNetV2(0.5, num_classes, final_conv=partial(_conv1x1, generator=csg))
    return attach_generator(model, csg, binary)


def _conv1x1(in_channels: int, out_channels: int, *, generator: ConvSliceGenerator) -> nn.Module:
    return GeneratedConv2d(in_channels, out_channels, 1, generator=generator)


# torchvision ResNets: (block attribute holding the generated conv) — the first 3×3 of a basic
# block, the 3×3 of a bottleneck.
TORCHVISION_GENERATED = {"resnet18": "conv1", "resnet50": "conv2", "resnet101": "conv2"}


def _register_torchvision(arch: str, attribute: str) -> None:
    @register_model(arch, method="csg")
    def build(num_classes: int, slice: int | None = None, code: int | None = None,
              binary: bool = False) -> nn.Module:
        csg = make_generator(arch, 3, slice, code, binary)
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in stage:
                setattr(block, attribute, generated_like(getattr(block, attribute), csg))
        return attach_generator(model, csg, binary)


for _depth in CIFAR_RESNET_DEPTHS:
    _register_cifar_resnet(f"cifar_resnet{_depth}", _depth)
for _arch in ("cifar_densenet_bc_40_36", "cifar_densenet_bc_40_48"):
    _register_cifar_densenet(_arch, *CIFAR_DENSENETS[_arch])
for _arch, _attribute in TORCHVISION_GENERATED.items():
    _register_torchvision(_arch, _attribute)
