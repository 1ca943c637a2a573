"""Dilated ResNet backbones: any registered torchvision-layout ResNet (the baseline or a
method's variant, built by the registry), its classifier dropped and the strides of its last
stages traded for dilation.

Output stride 8 dilates layer3 and layer4 (dilations 2 and 4), output stride 16 layer4 only
(2). The conversion is torchvision's ``replace_stride_with_dilation``, applied to the built
network so that it reaches every block type a method substitutes (gated, CE, generated,
selective): in a dilated stage the stride-2 convs of the first block (its strided 3×3 and the
downsample 1×1) take stride 1, and the first 3×3 conv of every block is dilated, the stage's
first block with the previous stage's dilation, the others with the stage's. For bottlenecks
that is exactly torchvision's network (a test compares them). torchvision's basic block
(ResNet-18) refuses dilation; here its first 3×3 is dilated and its second stays plain, as in
mmsegmentation's ResNet.

Differences from mmsegmentation's ResNet-V1c backbone of its DeepLabV3 / PSPNet configs: the
stem is torchvision's 7×7 conv (V1c: three 3×3 convs), and the first block of a dilated stage
keeps the previous dilation (mmseg: the stage's). Keeping torchvision's layout and attribute
names means a classification checkpoint of the same method variant loads into ``backbone.*``
(``model.backbone_init``: ``pipeline.engine.artifacts.init_backbone``).
"""
from __future__ import annotations

from torch import nn

from pipeline.config import ConfigError

from ...methods.csg import GeneratedConv2d

STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = ("layer1", "layer2", "layer3", "layer4")
# output stride: the stages whose stride 2 becomes a dilation (each doubling it)
DILATED_STAGES = {8: ("layer3", "layer4"), 16: ("layer4",)}


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, GeneratedConv2d))]


def dilate_stage(stage: nn.Sequential, dilation: int, previous: int) -> None:
    """Replace the stride of ``stage`` by ``dilation``, in place (see the module docstring)."""
    for i, block in enumerate(stage):
        convs = _convs(block)
        for conv in convs:
            conv.stride = (1, 1)
        first3x3 = next(conv for conv in convs if tuple(conv.kernel_size) == (3, 3))
        d = previous if i == 0 else dilation
        first3x3.dilation, first3x3.padding = (d, d), (d, d)


class ResNetBackbone(nn.Module):
    """The stem and four stages of a ResNet under their own names; forward gives the layer3
    and layer4 features (the auxiliary and the main head's inputs)."""

    def __init__(self, resnet: nn.Module, output_stride: int):
        super().__init__()
        if output_stride not in DILATED_STAGES:
            raise ConfigError(f"model.opts.output_stride: expected 8 or 16, got {output_stride!r}")
        for name in STEM + STAGES:
            setattr(self, name, getattr(resnet, name))
        # layer4's width is the classifier's input; layer3 is half of it in every ResNet
        self.channels = (resnet.fc.in_features // 2, resnet.fc.in_features)
        dilation = 1
        for name in DILATED_STAGES[output_stride]:
            dilate_stage(getattr(self, name), dilation * 2, dilation)
            dilation *= 2
        self.output_stride = output_stride

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)
