"""The joint image + label augmentation, as numbers both backends apply the same way.

Every random choice of a training sample comes from one row of uniform draws that depends on
(seed, epoch, sample index) alone, so a sample gets the same augmentation in both backends,
after a mid-epoch resume, and whatever the number of ranks or workers.

Geometry (mmsegmentation's RandomResize(ratio_range) + RandomCrop + RandomFlip, computed as
one resize of the crop window only):
    s ~ U(scale_range): the image scaled to (h·s, w·s), aspect ratio kept;
    a window of (oh, ow) = (min(crop_h, ⌊h·s⌋), min(crop_w, ⌊w·s⌋)) output pixels at a
    uniform position (top, left) ∈ [0, h·s − oh] × [0, w·s − ow] of the scaled image; in
    source pixels the ROI [top/s, (top+oh)/s] × [left/s, (left+ow)/s], resized to (oh, ow):
    image bilinear, label nearest neighbour, pixel centres mapped as
    src = roi_start + (dst + 0.5)·roi/out − 0.5 (the pixels of resizing the whole image and
    cropping, without computing those thrown away);
    then padded to crop_size at the bottom / right (image 0, label 255) and flipped
    horizontally with probability ½.
The position is sub-pixel (mmseg crops at integers): with integer offsets the source grid
repeats with period h/gcd(h, ⌊h·s⌋), and nearest-neighbour ties (a pixel centre equidistant
from two source pixels) recur on whole rows and columns, which float32 (DALI) and float64
(PIL) break differently; at random real positions the two backends give the same labels.
Photometric distortion (mmsegmentation's PhotoMetricDistortion), image only, before the pad;
each step applied with probability ½ and clipped to 0…255:
    brightness + δ, δ ~ U(−32, 32);  contrast × α, α ~ U(0.5, 1.5), either right after the
    brightness (one affine step (x + δ)·α: mmseg clips in between) or after the colour steps
    (a fair coin);  saturation × α, α ~ U(0.5, 1.5);  hue + δ, δ ~ U(−36°, 36°) (mmseg's ±18
    in OpenCV's half-degree units). Saturation and hue scale and turn the chroma in YIQ, as
    DALI's ``hsv`` does (mmseg shifts the hue in HSV: the same kind, not the same pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# columns of a row of draws
SCALE, TOP, LEFT, FLIP = 0, 1, 2, 3
(BRIGHT_ON, BRIGHT, CONTRAST_ON, CONTRAST, CONTRAST_FIRST, SATURATION_ON, SATURATION, HUE_ON,
 HUE) = range(4, 13)
NUM_DRAWS = 13

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA_DEGREES = 36.0


@dataclass(frozen=True)
class PairRecipe:
    crop: tuple[int, int]                    # (height, width)
    scale_range: tuple[float, float]
    photometric: bool
    mean: tuple[float, float, float]         # of pixel / 255
    std: tuple[float, float, float]


def recipe_from_config(cfg) -> PairRecipe:
    """The pair recipe of a DataConfig (``crop_size``, ``scale_range``, ``photometric``,
    ``mean``, ``std``)."""
    crop = tuple(int(v) for v in cfg.crop_size)
    if len(crop) != 2 or min(crop) <= 0:
        raise ValueError(f"data.crop_size must be [height, width] > 0, got {list(cfg.crop_size)}")
    scale = tuple(float(v) for v in cfg.scale_range)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"data.scale_range must be [low, high] with 0 < low <= high, "
                         f"got {list(cfg.scale_range)}")
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("data.mean and data.std must list 3 per-channel values (std > 0)")
    return PairRecipe(crop, scale, bool(cfg.photometric), mean, std)


def sample_draws(seed: int, epoch: int, indices) -> np.ndarray:
    """``[len(indices), NUM_DRAWS]`` uniforms in [0, 1); row i depends only on
    (seed, epoch, indices[i])."""
    states = [np.random.SeedSequence([seed, epoch, int(i)]).generate_state(NUM_DRAWS, np.uint64)
              for i in indices]
    return (np.array(states, np.uint64).reshape(-1, NUM_DRAWS) >> np.uint64(11)) * 2.0 ** -53


@dataclass(frozen=True)
class Geometry:
    """Per-sample crop windows of a batch; (y, x) / (height, width) order throughout."""
    out: np.ndarray          # [n, 2] int: resized window size (≤ crop size)
    roi_start: np.ndarray    # [n, 2] float32: window in source pixels
    roi_end: np.ndarray      # [n, 2] float32
    flip: np.ndarray         # [n] bool


def crop_geometry(sizes: np.ndarray, draws: np.ndarray, recipe: PairRecipe) -> Geometry:
    """Crop windows for images of ``sizes`` ``[n, 2]`` (height, width) from their draws."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    low, high = recipe.scale_range
    scale = (low + draws[:, SCALE] * (high - low))[:, None]
    scaled = sizes * scale
    out = np.clip(np.floor(scaled), 1.0, np.asarray(recipe.crop, np.float64))
    offset = draws[:, [TOP, LEFT]] * np.maximum(scaled - out, 0.0)
    # float32, as DALI takes them; the torchvision path reads the same rounded numbers
    roi_start = (offset / scale).astype(np.float32)
    roi_end = ((offset + out) / scale).astype(np.float32)
    return Geometry(out.astype(np.int64), roi_start, roi_end, draws[:, FLIP] < 0.5)


@dataclass(frozen=True)
class Photometric:
    """Per-sample distortion parameters; a step not drawn has its identity value."""
    brightness: np.ndarray       # [n] float32: added to 0…255 pixels
    contrast_first: np.ndarray   # [n] float32: multiplier before the colour steps
    saturation: np.ndarray       # [n] float32: multiplier
    hue: np.ndarray              # [n] float32: degrees
    contrast_last: np.ndarray    # [n] float32: multiplier after the colour steps


def _maybe(draws: np.ndarray, on: int, value: np.ndarray, identity: float) -> np.ndarray:
    return np.where(draws[:, on] < 0.5, value, identity).astype(np.float32)


def photometric_params(draws: np.ndarray) -> Photometric:
    brightness = _maybe(draws, BRIGHT_ON, (2 * draws[:, BRIGHT] - 1) * BRIGHTNESS_DELTA, 0.0)
    low, high = CONTRAST_RANGE
    contrast = _maybe(draws, CONTRAST_ON, low + draws[:, CONTRAST] * (high - low), 1.0)
    first = draws[:, CONTRAST_FIRST] < 0.5
    low, high = SATURATION_RANGE
    saturation = _maybe(draws, SATURATION_ON, low + draws[:, SATURATION] * (high - low), 1.0)
    hue = _maybe(draws, HUE_ON, (2 * draws[:, HUE] - 1) * HUE_DELTA_DEGREES, 0.0)
    return Photometric(brightness, np.where(first, contrast, 1.0).astype(np.float32),
                       saturation, hue, np.where(first, 1.0, contrast).astype(np.float32))
