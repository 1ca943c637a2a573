"""Semantic segmentation networks: DeepLabV3 and PSPNet heads with an auxiliary FCN head on
dilated ResNet-18/50/101 backbones, for the baseline and every method (``nets``)."""
from . import nets  # noqa: F401  (registers the networks)
