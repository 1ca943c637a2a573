"""The embedded dataset: generated street scenes in the exact Cityscapes layout and naming.

    OUT/leftImg8bit/{train,val,test}/<city>/<city>_<seq:06>_<frame:06>_leftImg8bit.png
    OUT/gtFine/{train,val,test}/<city>/<city>_<seq:06>_<frame:06>_gtFine_{labelIds,instanceIds,color}.png

with the real cities of each split and frame 19, as in Cityscapes; instance ids as 16-bit
PNGs, colours from ``cityscapesscripts``. No ``_polygons.json``: nothing here reads them. The
scenes are ``scenes.render``'s. The test split's labels hold only what camera calibration knows
(ego vehicle, rectification border, out of roi; the rest ``unlabeled``), like the official
test annotations (cityscapesScripts issue #57).

Each image is drawn from its own seeded generator (seed, split, index): the tree is the same
on every machine. It is written beside ``OUT`` and renamed into place at the end, so an
interrupted write leaves no half-made dataset.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

from pipeline.data.segmentation.scenes import render

CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster"),
          "test": ("berlin", "bielefeld", "bonn")}
FRAME = 19
# Width, height: Cityscapes' 2:1 at 3/16 scale. Objects are then wide enough for a stride-16
# network: a perfect output-stride-16 logit map (the one-hot labels average-pooled by 16 and
# upsampled bilinearly) scores mIoU 0.87 on these scenes at 384×192, 0.84 at 320×160 and
# 0.76 at 256×128 (poles and people lose most), so a trained DeepLabV3 can clear 0.70.
DEFAULT_SIZE = (384, 192)
DEFAULT_COUNT = 80                 # training images (~5.7 MB in all); val and test get // 5, // 10


def colour_table() -> np.ndarray:
    """[256, 3] uint8: label id → the Cityscapes display colour."""
    table = np.zeros((256, 3), np.uint8)
    for label in CITYSCAPES_LABELS:
        if label.id >= 0:
            table[label.id] = label.color
    return table


def _write(folder: dict[str, Path], stem: str, image, label, instance, colours: np.ndarray) -> None:
    Image.fromarray(image).save(folder["image"] / f"{stem}_leftImg8bit.png")
    gt = folder["gt"]
    Image.fromarray(label).save(gt / f"{stem}_gtFine_labelIds.png")
    Image.fromarray(instance).save(gt / f"{stem}_gtFine_instanceIds.png")
    Image.fromarray(colours[label]).save(gt / f"{stem}_gtFine_color.png")


def split_counts(count: int) -> dict[str, int]:
    return {"train": count, "val": max(1, count // 5), "test": max(1, count // 10)}


def write_cityscapes_synth(out_dir: str | Path, size: tuple[int, int] = DEFAULT_SIZE,
                           count: int = DEFAULT_COUNT, seed: int = 0) -> dict:
    """Write the tree (``size`` = (width, height), ``count`` training images); returns
    ``{"train": n, "val": n, "test": n, "classes": 19, "root": …}``.

    Raises FileExistsError if ``out_dir`` exists, so a present dataset is never overwritten.
    """
    out = Path(out_dir)
    width, height = (int(v) for v in size)
    if width < 32 or height < 16 or count < 1:
        raise ValueError(f"cityscapes-synth needs a size of at least 32x16 and count >= 1, "
                         f"got {width}x{height} and {count}")
    if out.exists():
        raise FileExistsError(f"cityscapes-synth output directory already exists: {out}")
    counts = split_counts(count)
    colours = colour_table()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split_index, (split, n) in enumerate(counts.items()):
            cities = CITIES[split]
            for i in range(n):
                city, seq = cities[i % len(cities)], i // len(cities)
                folder = {"image": tmp / "leftImg8bit" / split / city,
                          "gt": tmp / "gtFine" / split / city}
                for path in folder.values():
                    path.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng([seed, split_index, i])
                scene = render(rng, width, height, labelled=split != "test")
                _write(folder, f"{city}_{seq:06d}_{FRAME:06d}", *scene, colours)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)   # mkdtemp made it private; the tree is for everyone
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    classes = len({label.trainId for label in CITYSCAPES_LABELS if 0 <= label.trainId < 255})
    return {**counts, "classes": classes, "size": f"{width}x{height}", "root": str(out)}
