"""The augmentation recipes, as plain numbers both backends build their transforms from.

imagenet  train: random-resized crop (area ``scale``, aspect ``ratio``) to ``size``, flip;
          val:   resize the shorter side to ``floor(size / val_resize_ratio)``, centre crop.
cifar     train: zero-pad ``pad`` pixels on each side, random ``size`` crop, flip;
          val:   centre crop ``size`` (a no-op on images of that size; zero-padded if smaller).
Both then normalise: ``(pixel / 255 - mean) / std`` per channel, float32 CHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

RECIPES = ("imagenet", "cifar")


@dataclass(frozen=True)
class Recipe:
    name: str
    size: int
    resize_shorter: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    pad: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _pair(cfg, key: str) -> tuple[float, float]:
    value = tuple(float(v) for v in getattr(cfg, key))
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"data.{key} must be [low, high], got {list(value)}")
    return value


def _triple(cfg, key: str) -> tuple[float, float, float]:
    value = tuple(float(v) for v in getattr(cfg, key))
    if len(value) != 3:
        raise ValueError(f"data.{key} must list 3 per-channel values, got {list(value)}")
    return value


def recipe_from_config(cfg) -> Recipe:
    """The recipe of a DataConfig (or any object with its attributes)."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"data.recipe must be one of {list(RECIPES)}, got {cfg.recipe!r}")
    size = int(cfg.image_size)
    if size <= 0 or not 0 < float(cfg.val_resize_ratio) <= 1:
        raise ValueError("data.image_size must be > 0 and data.val_resize_ratio in (0, 1]")
    return Recipe(name=cfg.recipe, size=size,
                  resize_shorter=math.floor(size / float(cfg.val_resize_ratio)),
                  scale=_pair(cfg, "scale"), ratio=_pair(cfg, "ratio"), pad=int(cfg.pad),
                  mean=_triple(cfg, "mean"), std=_triple(cfg, "std"))
