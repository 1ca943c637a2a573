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

import numpy as np

from pipeline.config import ConfigError

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
        raise ConfigError(f"data.{key} must be [low, high], got {list(value)}")
    return value


def _triple(cfg, key: str) -> tuple[float, float, float]:
    value = tuple(float(v) for v in getattr(cfg, key))
    if len(value) != 3:
        raise ConfigError(f"data.{key} must list 3 per-channel values, got {list(value)}")
    return value


def recipe_from_config(cfg) -> Recipe:
    """The recipe of a DataConfig (or any object with its attributes)."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"data.recipe must be one of {list(RECIPES)}, got {cfg.recipe!r}")
    size = int(cfg.image_size)
    if size <= 0 or not 0 < float(cfg.val_resize_ratio) <= 1:
        raise ConfigError("data.image_size must be > 0 and data.val_resize_ratio in (0, 1]")
    return Recipe(name=cfg.recipe, size=size,
                  resize_shorter=math.floor(size / float(cfg.val_resize_ratio)),
                  scale=_pair(cfg, "scale"), ratio=_pair(cfg, "ratio"), pad=int(cfg.pad),
                  mean=_triple(cfg, "mean"), std=_triple(cfg, "std"))


# ---- per-sample augmentation ---------------------------------------------------------------------
# Both backends draw a training sample's augmentation from (pass key, sample index) alone — not
# from a stream shared by the batch, rank or worker — so a batch read after a mid-epoch resume,
# with any worker count, is bit-identical to the uninterrupted one, and both backends crop the
# same windows.

ATTEMPTS = 10                 # random-resized crop tries before the fallback, as in torchvision
DRAWS = 2 * ATTEMPTS + 3      # area and aspect per try, then x, y, flip


def sample_draws(key: int, indices) -> np.ndarray:
    """``[len(indices), DRAWS]`` uniforms in [0, 1); row i depends only on (key, indices[i])."""
    states = [np.random.SeedSequence([key, int(i)]).generate_state(DRAWS, np.uint64)
              for i in indices]
    return (np.array(states, np.uint64).reshape(-1, DRAWS) >> np.uint64(11)) * 2.0 ** -53


@dataclass(frozen=True)
class Crops:
    """Per-sample crop windows in image pixels (may reach outside the image: zero padding) and
    horizontal flips."""
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    flip: np.ndarray


def _resized_crop(recipe: Recipe, draws: np.ndarray, width: np.ndarray, height: np.ndarray):
    # torchvision's RandomResizedCrop.get_params, vectorised over samples and tries.
    log_lo, log_hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    area = (width * height)[:, None] * (recipe.scale[0] + (recipe.scale[1] - recipe.scale[0])
                                        * draws[:, :ATTEMPTS])
    aspect = np.exp(log_lo + (log_hi - log_lo) * draws[:, ATTEMPTS:2 * ATTEMPTS])
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first, found = fits.argmax(1), fits.any(1)
    rows = np.arange(len(draws))
    # No try fits: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    lo, hi = min(recipe.ratio), max(recipe.ratio)
    fall_w = np.where(in_ratio > hi, np.round(height * hi), width)
    fall_h = np.where(in_ratio < lo, np.round(width / lo), height)
    w = np.where(found, w[rows, first], fall_w)
    h = np.where(found, h[rows, first], fall_h)
    x = np.where(found, np.floor(draws[:, -3] * (width - w + 1)), (width - w) // 2)
    y = np.where(found, np.floor(draws[:, -2] * (height - h + 1)), (height - h) // 2)
    return x, y, w, h


def train_crops(recipe: Recipe, draws: np.ndarray, sizes) -> Crops:
    """The crops of training samples with ``draws`` (``sample_draws``) and image ``sizes``
    ``[(width, height), …]``: imagenet a random-resized crop (resized to ``size`` after),
    cifar a ``size`` window of the image zero-padded by ``pad``."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    width, height = sizes[:, 0], sizes[:, 1]
    if recipe.name == "imagenet":
        x, y, w, h = _resized_crop(recipe, draws, width, height)
    else:
        span = 2 * recipe.pad - recipe.size + 1
        x = np.floor(draws[:, -3] * (width + span)) - recipe.pad
        y = np.floor(draws[:, -2] * (height + span)) - recipe.pad
        w = h = np.full(len(draws), float(recipe.size))
    return Crops(*(v.astype(np.int64) for v in (x, y, w, h)), flip=draws[:, -1] < 0.5)
