"""The segmentation network: a dilated ResNet backbone, a decode head on layer4, and in
training an auxiliary FCN head on layer3.

Output contract: ``forward(images)`` returns ``{"out": logits}``, logits ``[N, classes, H, W]``
at the input's resolution (bilinear, ``align_corners=False``); in training mode with the
auxiliary head on, also ``"aux"`` at the same resolution (weighted by the task's
``segmentation.aux_weight``). In eval mode the auxiliary head does not run.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError

from .backbone import ResNetBackbone
from .heads import ConvFactory, aspp_head, fcn_head, psp_head, resize

HEADS = ("deeplabv3", "pspnet")


class SegmentationModel(nn.Module):
    def __init__(self, backbone: ResNetBackbone, head: nn.Module, aux_head: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        c3, c4 = self.backbone(images)
        size = images.shape[-2:]
        out = {"out": resize(self.head(c4), size)}
        if self.training and self.aux_head is not None:
            out["aux"] = resize(self.aux_head(c3), size)
        return out


def check_options(output_stride, aux, dropout, channels) -> None:
    """One-line errors for the segmentation options of ``model.opts``."""
    if output_stride not in (8, 16) or isinstance(output_stride, bool):
        raise ConfigError(f"model.opts.output_stride: expected 8 or 16, got {output_stride!r}")
    if not isinstance(aux, bool):
        raise ConfigError(f"model.opts.aux: expected true or false, got {aux!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model.opts.dropout: expected a number in [0, 1), got {dropout!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
        raise ConfigError(f"model.opts.channels: expected an integer >= 2, got {channels!r}")


def segmentation_model(head: str, resnet: nn.Module, num_classes: int, output_stride: int,
                       aux: bool, dropout: float, channels: int,
                       atrous_conv: ConvFactory = nn.Conv2d) -> SegmentationModel:
    """``head`` on the dilated ``resnet`` (its classifier dropped); the auxiliary head is half
    as wide. ``atrous_conv`` builds DeepLab's atrous convs."""
    check_options(output_stride, aux, dropout, channels)
    backbone = ResNetBackbone(resnet, output_stride)
    c3, c4 = backbone.channels
    if head == "deeplabv3":
        decode = aspp_head(c4, channels, num_classes, output_stride, dropout, atrous_conv)
    elif head == "pspnet":
        decode = psp_head(c4, channels, num_classes, dropout)
    else:
        raise ValueError(f"unknown segmentation head {head!r} (expected one of {HEADS})")
    aux_head = fcn_head(c3, channels // 2, num_classes, dropout) if aux else None
    return SegmentationModel(backbone, decode, aux_head)
