"""``--method ce`` builders: the baseline network with CE blocks put after chosen BNs.

Each chosen BN is replaced by ``NormCE(bn)`` (BN → CE), so the blocks' forwards are unchanged.

Placement:
- torchvision ResNets (resnet18/34/50/101), as the reference: after the last BN of the residual
  branch (``bn2`` of a basic block, ``bn3`` of a bottleneck), before the addition, in every block
  of layer1–layer3, none in layer4; plus the stem CE after ``bn1``, before the ReLU, with one
  group of ``stem_group_size`` (64) channels.
- CIFAR ResNets: the same rule; their three stages are layer1–layer3 (there is no layer4) and
  the stem CE has one group of all 16 channels (64 halved to 16).
- mobilenet_v2 and shufflenet_v2_x1_0 (our choice; the paper's placement there is unverified):
  after the last BN of every inverted-residual block's conv branch (mobilenet_v2), and of the
  right branch (``branch2``, before its ReLU) of every ShuffleNet unit; no stem CE.

Structural options (``model.opts``): ``group_size`` d (16), ``stem_group_size`` (64),
``iterations`` T (3), ``trace_rescale`` (False).
"""
from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from ..methods.ce import NormCE
from .cifar_resnet import CIFAR_RESNET_DEPTHS
from .registry import build_model, register_model

RESNET_CE_STAGES = ("layer1", "layer2", "layer3")


def _with_ce(bn: nn.BatchNorm2d, group_size: int, iterations: int,
             trace_rescale: bool) -> NormCE:
    return NormCE(bn, group_size=group_size, iterations=iterations, trace_rescale=trace_rescale)


def _last_branch_bn(branch: nn.Sequential) -> int:
    return max(i for i, m in enumerate(branch) if isinstance(m, nn.BatchNorm2d))


def add_ce_to_resnet(model: nn.Module, group_size: int = 16, stem_group_size: int = 64,
                     iterations: int = 3, trace_rescale: bool = False) -> nn.Module:
    """Torchvision-layout ResNet (CIFAR ones too): stem CE and CE in the blocks of layer1–3."""
    model.bn1 = _with_ce(model.bn1, stem_group_size, iterations, trace_rescale)
    for stage in RESNET_CE_STAGES:
        for block in getattr(model, stage):
            last = "bn3" if hasattr(block, "bn3") else "bn2"
            setattr(block, last,
                    _with_ce(getattr(block, last), group_size, iterations, trace_rescale))
    return model


def add_ce_to_branches(branches: list[nn.Sequential], group_size: int = 16,
                       iterations: int = 3, trace_rescale: bool = False) -> None:
    """CE after the last BN of each given branch (an nn.Sequential), in place."""
    for branch in branches:
        i = _last_branch_bn(branch)
        branch[i] = _with_ce(branch[i], group_size, iterations, trace_rescale)


def _register_resnet(arch: str) -> None:
    @register_model(arch, method="ce")
    def build(num_classes: int, group_size: int = 16, stem_group_size: int = 64,
              iterations: int = 3, trace_rescale: bool = False) -> nn.Module:
        return add_ce_to_resnet(build_model(arch, num_classes), group_size, stem_group_size,
                                iterations, trace_rescale)


@register_model("mobilenet_v2", method="ce")
def build_mobilenet_v2(num_classes: int, group_size: int = 16, iterations: int = 3,
                       trace_rescale: bool = False) -> nn.Module:
    model = build_model("mobilenet_v2", num_classes)
    blocks = [m.conv for m in model.modules() if isinstance(m, tvm.mobilenetv2.InvertedResidual)]
    add_ce_to_branches(blocks, group_size, iterations, trace_rescale)
    return model


@register_model("shufflenet_v2_x1_0", method="ce")
def build_shufflenet_v2(num_classes: int, group_size: int = 16, iterations: int = 3,
                        trace_rescale: bool = False) -> nn.Module:
    model = build_model("shufflenet_v2_x1_0", num_classes)
    branches = [m.branch2 for m in model.modules()
                if isinstance(m, tvm.shufflenetv2.InvertedResidual)]
    add_ce_to_branches(branches, group_size, iterations, trace_rescale)
    return model


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    _register_resnet(_arch)
for _depth in CIFAR_RESNET_DEPTHS:
    _register_resnet(f"cifar_resnet{_depth}")
