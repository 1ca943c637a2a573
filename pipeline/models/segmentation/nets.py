"""Registered segmentation networks ``{deeplabv3,pspnet}_resnet{18,50,101}``, for the baseline
and every method. A method's variant takes the method's own ResNet from the registry (its
classification builder decides the placement: ``gated_nets``, ``ce_nets``, ``csg_nets``) and
puts the heads on it; selective convolution regroups the baseline's blocks (``selective``).

- ``gated``: every backbone block gated as in the classification ResNet; the heads are plain.
  The gating method's compute meter counts the heads' convs in full.
- ``ce``: CE after the stem BN and in every block of layer1–layer3, as in the classification
  ResNet; none in layer4 or the heads.
- ``csg``: the backbone's generated convs (the 3×3 of each bottleneck, the first 3×3 of each
  basic block) from one CSG, registered as ``backbone.csg``; DeepLabV3's three 3×3 atrous ASPP
  convs from a second CSG, ``head.context.csg``, as the CSG authors' DeepLab does. Both take
  the options ``slice``, ``code``, ``binary`` (default [16,16,3,3]-128, the authors' for both).
  The authors' DeepLab is a V3+ with a 256-wide ASPP (``channels: 256`` gives that width).
  PSPNet's head has no atrous conv: one CSG.
- ``selectconv``: see ``selective``.

Segmentation options (``model.opts``): ``output_stride`` 8 | 16 (8), ``aux`` (true),
``dropout`` (0.1), ``channels`` (head width; 512, 128 for ResNet-18, as mmseg); a method's
structural options pass through to its backbone builder.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from pipeline.config import ConfigError

from ...methods.csg import GeneratedConv2d, attach_generator
from ..csg_nets import make_generator
from ..registry import build_model, register_model
from .model import HEADS, SegmentationModel, segmentation_model
from .selective import selective_resnet_

# backbone: the width of the decode head (the auxiliary head's is half)
HEAD_CHANNELS = {"resnet18": 128, "resnet50": 512, "resnet101": 512}


def _width(arch: str, channels: int | None) -> int:
    return HEAD_CHANNELS[arch] if channels is None else channels


def _method_resnet(name: str, arch: str, method: str, opts: dict) -> nn.Module:
    """The method's classification ResNet (its classifier is dropped by the backbone)."""
    try:
        return build_model(arch, 1, method=method, **opts)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


def _register(head: str, arch: str) -> None:
    name = f"{head}_{arch}"

    @register_model(name)
    def baseline(num_classes: int, output_stride: int = 8, aux: bool = True,
                 dropout: float = 0.1, channels: int | None = None) -> SegmentationModel:
        return segmentation_model(head, build_model(arch, 1), num_classes, output_stride, aux,
                                  dropout, _width(arch, channels))

    def register_variant(method: str) -> None:
        @register_model(name, method=method, extends=arch)  # method_opts: its ResNet's
        def variant(num_classes: int, output_stride: int = 8, aux: bool = True,
                    dropout: float = 0.1, channels: int | None = None,
                    **method_opts) -> SegmentationModel:
            resnet = _method_resnet(name, arch, method, method_opts)
            return segmentation_model(head, resnet, num_classes, output_stride, aux, dropout,
                                      _width(arch, channels))

    register_variant("gated")
    register_variant("ce")

    @register_model(name, method="csg")
    def csg(num_classes: int, output_stride: int = 8, aux: bool = True, dropout: float = 0.1,
            channels: int | None = None, slice: int | None = None, code: int | None = None,
            binary: bool = False) -> SegmentationModel:
        resnet = _method_resnet(name, arch, "csg", dict(slice=slice, code=code, binary=binary))
        atrous_conv = nn.Conv2d
        if head == "deeplabv3":
            aspp_csg = make_generator(arch, 3, slice, code, binary)
            atrous_conv = partial(GeneratedConv2d, generator=aspp_csg)
        model = segmentation_model(head, resnet, num_classes, output_stride, aux, dropout,
                                   _width(arch, channels), atrous_conv)
        # the classification builder registered (and binarised) the CSG on the ResNet, whose
        # forward no longer runs: register it on the backbone that replaces it
        attach_generator(model.backbone, resnet.csg)
        if head == "deeplabv3":
            attach_generator(model.head.context, aspp_csg, binary)
        return model

    @register_model(name, method="selectconv")
    def selectconv(num_classes: int, output_stride: int = 8, aux: bool = True,
                   dropout: float = 0.1, channels: int | None = None) -> SegmentationModel:
        return segmentation_model(head, selective_resnet_(build_model(arch, 1)), num_classes,
                                  output_stride, aux, dropout, _width(arch, channels))


for _head in HEADS:
    for _arch in HEAD_CHANNELS:
        _register(_head, _arch)
