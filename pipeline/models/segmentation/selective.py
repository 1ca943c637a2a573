"""Selective-convolution ResNet blocks for the segmentation backbones (our placement).

Selective convolution replaces pre-activation BN → ReLU → conv units; a torchvision ResNet
block is post-activation, conv → BN → ReLU → conv → …, so its BN → ReLU → conv units are the
INPUTS of the convs after the first: the block is regrouped as

    Bottleneck:  conv1 → unit2 [bn1 → ReLU → conv2 (3×3), K = 3]
                       → unit3 [bn2 → ReLU → conv3 (1×1), K = 0] → bn3 → + shortcut → ReLU
    BasicBlock:  conv1 → unit2 [bn1 → ReLU → conv2 (3×3), K = 3] → bn2 → + shortcut → ReLU

with the same function and weights (the units take the block's BN and conv). conv1 (its
input is the residual stream) and the shortcut stay plain. K = 3 units re-allocate channels
(shifted copies); the K = 0 unit only prunes, and because its whole input comes from unit2,
``SelectConv.export`` removes its closed input channels and unit2's filters producing them —
the pairing of the authors' dense layers (re-allocating unit → pruning unit), here with the
3×3 re-allocating and the expanding 1×1 pruning. The authors assign K by role (reduce and
expand 1×1: K = 3, 3×3: K = 0) in pre-activation networks; in this regrouping that would put
the pruning unit after a plain conv, which export cannot shrink.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..selective_nets import selective_from
from .backbone import STAGES

REALLOCATING_K, PRUNING_K = 3, 0


class SelectiveBottleneck(nn.Module):
    def __init__(self, block: Bottleneck):
        super().__init__()
        self.conv1 = block.conv1
        self.unit2 = selective_from(block.bn1, block.conv2, REALLOCATING_K)
        self.unit3 = selective_from(block.bn2, block.conv3, PRUNING_K)  # right after unit2
        self.bn3 = block.bn3
        self.relu = block.relu
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn3(self.unit3(self.unit2(self.conv1(x)))) + identity)


class SelectiveBasicBlock(nn.Module):
    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv1 = block.conv1
        self.unit2 = selective_from(block.bn1, block.conv2, REALLOCATING_K)
        self.bn2 = block.bn2
        self.relu = block.relu
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.unit2(self.conv1(x))) + identity)


def selective_resnet_(resnet: nn.Module) -> nn.Module:
    """Every block of a torchvision ResNet regrouped with selective units, in place."""
    for name in STAGES:
        stage = getattr(resnet, name)
        for i, block in enumerate(stage):
            stage[i] = (SelectiveBottleneck if isinstance(block, Bottleneck)
                        else SelectiveBasicBlock)(block)
    return resnet
