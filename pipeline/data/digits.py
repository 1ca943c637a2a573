"""The embedded dataset: scikit-learn's bundled digits as an ImageNet-layout tree of JPEGs.

1797 greyscale 8×8 images with values 0..16 become RGB JPEGs of ``size``×``size`` (bicubic
upsampling of the 0..255-scaled image), written as ``out_dir/{train,val}/<digit>/<index>.jpg``
with a fixed, seeded, stratified split. The tree is written beside ``out_dir`` and renamed into
place at the end, so an interrupted write leaves no half-made dataset.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

JPEG_QUALITY = 95


def _to_image(pixels: np.ndarray, size: int) -> Image.Image:
    grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def write_digits(out_dir: str | Path, size: int = 32, val_fraction: float = 0.2,
                 seed: int = 0) -> dict:
    """Write the digits tree; returns ``{"train": n, "val": n, "classes": 10, "root": …}``.

    Raises FileExistsError if ``out_dir`` exists, so a present dataset is never overwritten.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"digits output directory already exists: {out}")
    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for name in map(str, digits.target_names):
                (tmp / split / name).mkdir(parents=True)
            for i in sorted(ids):
                path = tmp / split / str(digits.target[i]) / f"{i:04d}.jpg"
                _to_image(digits.images[i], size).save(path, quality=JPEG_QUALITY)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"train": len(train_idx), "val": len(val_idx),
            "classes": len(digits.target_names), "root": str(out)}
