"""Segmentation dataset layouts, scanned into ordered (image, label) file pairs.

Cityscapes  ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png with
            ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (label ids,
            mapped to train ids), or ``_gtFine_labelTrainIds.png`` when every image of the
            split has one (``csCreateTrainIdLabelImgs`` writes them for all).
VOC 2012    ROOT/JPEGImages/<id>.jpg with ROOT/SegmentationClass/<id>.png (palette PNGs: the
            pixel values are the class indices), or ROOT/SegmentationClassAug/<id>.png (SBD,
            greyscale) for ids that have no SegmentationClass file. The train split is the
            list ``ImageSets/Segmentation/<data.voc_train_list>.txt`` (or a ``.txt`` path
            relative to ROOT), the val split ``ImageSets/Segmentation/val.txt``; the two must
            not share an image. ROOT may also be the VOCdevkit folder holding VOC2012/.

Checks, at scan time, from headers only (one PIL header parse per image, 33 bytes per label,
plus the magic / tail check of ``pipeline.data.layout`` for truncated files): every image has
its label and every label its image, the label is an 8-bit greyscale PNG (VOC: or palette)
of its image's size, neither file is truncated. A problem is a one-line ``DataError`` naming
the file; ``on_corrupt="skip"`` drops the pair and records the file in the split's
``skipped`` list instead. Label values outside the table are only visible after decoding:
the loaders check them per sample (see ``pipeline.data.segmentation``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.data.layout import DataError, is_readable_image
from pipeline.data.segmentation.labels import (GREY, PALETTE, RGB, RGBA, LabelTable,
                                               cityscapes_classes, cityscapes_label_ids,
                                               cityscapes_train_ids, png_header, voc_indices)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
_SCAN_THREADS = 8


@dataclass(frozen=True)
class PairSplit:
    images: list[str]
    labels: list[str]
    sizes: list[tuple[int, int]]      # (height, width) of each image, from its header
    table: LabelTable                 # what the label files' values mean
    skipped: list[str] = field(default_factory=list)   # files of dropped pairs (on_corrupt=skip)

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class SegLayout:
    root: str
    classes: list[str]                # train-id names
    train: PairSplit
    val: PairSplit

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + self.val.skipped


# ---- per-pair header checks ------------------------------------------------------------------

_MODE_NAMES = {GREY: "greyscale", RGB: "RGB", PALETTE: "palette", 4: "greyscale+alpha",
               RGBA: "RGBA"}


def _pair_problem(image: str, label: str, label_types: tuple[int, ...]
                  ) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(image (height, width), problem, file at fault) for one pair; problem None if fine."""
    if not is_readable_image(image):
        return None, f"corrupt or non-image file: {image}", image
    try:
        with Image.open(image) as im:
            width, height = im.size
    except Exception:  # PIL raises several types for a bad header
        return None, f"corrupt or non-image file: {image}", image
    header = png_header(label)
    if header is None or not is_readable_image(label):
        return None, f"label is not a readable PNG file: {label}", label
    if header.colour_type not in label_types or header.bit_depth != 8:
        wanted = " or ".join(_MODE_NAMES[t] for t in label_types)
        found = f"{header.bit_depth}-bit {_MODE_NAMES.get(header.colour_type, '?')}"
        return None, (f"label PNG holds {found} pixels, expected 8-bit {wanted} class values: "
                      f"{label}"), label
    if (header.width, header.height) != (width, height):
        return None, (f"label size {header.width}x{header.height} differs from its image's "
                      f"{width}x{height}: {label}"), label
    return (height, width), None, None


def _checked(images: list[str], labels: list[str], label_types: tuple[int, ...],
             problems: list[tuple[str, str]]) -> list[tuple[int, int] | None]:
    """Image sizes of the pairs (None for a bad pair, whose problem is appended)."""
    def check(pair):
        return _pair_problem(*pair, label_types)

    pairs = list(zip(images, labels))
    with ThreadPoolExecutor(_SCAN_THREADS) as pool:   # header reads are system calls
        results = list(pool.map(check, pairs, chunksize=64))
    for size, problem, culprit in results:
        if problem is not None:
            problems.append((problem, culprit))
    return [size for size, _, _ in results]


def _build_split(images: list[str], labels: list[str], table: LabelTable,
                 label_types: tuple[int, ...], problems: list[tuple[str, str]],
                 on_corrupt: str, where: Path) -> PairSplit:
    """Check the pairs; raise the first problem (on_corrupt=fail) or drop the bad pairs."""
    sizes = _checked(images, labels, label_types, problems)
    if problems and on_corrupt == "fail":
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0][0]}{more}; set data.on_corrupt=skip to drop such pairs")
    kept = [i for i, size in enumerate(sizes) if size is not None]
    if not kept:
        raise DataError(f"no usable image/label pairs in {where}")
    return PairSplit([images[i] for i in kept], [labels[i] for i in kept],
                     [sizes[i] for i in kept], table, [culprit for _, culprit in problems])


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ("fail", "skip"):
        raise DataError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")


# ---- Cityscapes ------------------------------------------------------------------------------

def _files_by_key(split_dir: Path, suffix: str) -> dict[str, str]:
    """``<city>/<city>_<seq>_<frame>`` → path of every ``<city>/*<suffix>`` under split_dir."""
    found = {}
    with os.scandir(split_dir) as cities:
        for city in cities:
            if city.name.startswith(".") or not city.is_dir():
                continue
            with os.scandir(city.path) as entries:
                for entry in entries:
                    if entry.name.endswith(suffix) and not entry.name.startswith("."):
                        found[f"{city.name}/{entry.name[:-len(suffix)]}"] = entry.path
    return found


def _cityscapes_dir(root: Path, folder: str, split: str, example: str) -> Path:
    path = root / folder / split
    if not path.is_dir():
        raise DataError(f"missing Cityscapes folder: {path} "
                        f"(expected {root}/{folder}/{split}/<city>/<city>_<seq>_<frame>{example})")
    return path


def scan_cityscapes_split(root: str | Path, split: str, on_corrupt: str = "fail") -> PairSplit:
    """The (image, label) pairs of one Cityscapes split (train, val or test), sorted."""
    _check_on_corrupt(on_corrupt)
    root = Path(root)
    image_dir = _cityscapes_dir(root, "leftImg8bit", split, IMAGE_SUFFIX)
    label_dir = _cityscapes_dir(root, "gtFine", split, LABEL_ID_SUFFIX)
    images = _files_by_key(image_dir, IMAGE_SUFFIX)
    if not images:
        raise DataError(f"no *{IMAGE_SUFFIX} images in {image_dir}/<city>/")
    train_ids = _files_by_key(label_dir, TRAIN_ID_SUFFIX)
    if train_ids and images.keys() <= train_ids.keys():
        labels, suffix, table = train_ids, TRAIN_ID_SUFFIX, cityscapes_train_ids()
    else:
        labels, suffix, table = _files_by_key(label_dir, LABEL_ID_SUFFIX), LABEL_ID_SUFFIX, \
            cityscapes_label_ids()
    problems = [(f"no label for image {images[k]} (expected {label_dir / k}{suffix})", images[k])
                for k in sorted(images.keys() - labels.keys())]
    problems += [(f"label without image: {labels[k]} (expected {image_dir / k}{IMAGE_SUFFIX})",
                  labels[k]) for k in sorted(labels.keys() - images.keys())]
    keys = sorted(images.keys() & labels.keys())
    return _build_split([images[k] for k in keys], [labels[k] for k in keys], table, (GREY,),
                        problems, on_corrupt, image_dir)


def scan_cityscapes(root: str | Path, on_corrupt: str = "fail") -> SegLayout:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root} (expected {root}/leftImg8bit/ and "
                        f"{root}/gtFine/, the Cityscapes layout)")
    return SegLayout(str(root), list(cityscapes_classes()),
                     scan_cityscapes_split(root, "train", on_corrupt),
                     scan_cityscapes_split(root, "val", on_corrupt))


# ---- Pascal VOC 2012 -------------------------------------------------------------------------

def voc_base(root: str | Path) -> Path:
    """The VOC2012 folder: ROOT itself, or ROOT/VOC2012 (ROOT = VOCdevkit)."""
    root = Path(root)
    for base in (root, root / "VOC2012"):
        if (base / "JPEGImages").is_dir():
            return base
    raise DataError(f"no JPEGImages/ in {root} (expected the VOC2012 folder: "
                    f"JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")


def _list_path(base: Path, name: str) -> Path:
    return base / name if name.endswith(".txt") else \
        base / "ImageSets" / "Segmentation" / f"{name}.txt"


def _read_list(path: Path) -> list[str]:
    """Image ids of a list file: one id per line, or ``<image path> <label path>`` lines."""
    if not path.is_file():
        raise DataError(f"VOC list file not found: {path} (set data.voc_train_list to a list "
                        f"name in ImageSets/Segmentation/ or a .txt path under the VOC root)")
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"empty VOC list file: {path}")
    return ids


def _names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as it:
        return {e.name for e in it}


def scan_voc_split(root: str | Path, list_name: str, on_corrupt: str = "fail") -> PairSplit:
    """The (image, label) pairs listed in one VOC list, in list order."""
    _check_on_corrupt(on_corrupt)
    base = voc_base(root)
    ids = _read_list(_list_path(base, list_name))
    jpegs = _names(base / "JPEGImages")
    folders = [base / "SegmentationClass", base / "SegmentationClassAug"]
    present = [_names(folder) for folder in folders]
    images, labels, problems = [], [], []
    for name in ids:
        image = base / "JPEGImages" / f"{name}.jpg"
        label = next((folder / f"{name}.png" for folder, names in zip(folders, present)
                      if f"{name}.png" in names), None)
        if label is None:
            where = " or ".join(str(f / f"{name}.png") for f, n in zip(folders, present) if n) \
                or str(folders[0] / f"{name}.png")
            problems.append((f"no label for image {image} (expected {where})", str(image)))
        elif f"{name}.jpg" not in jpegs:
            problems.append((f"label without image: {label} (expected {image})", str(label)))
        else:
            images.append(str(image))
            labels.append(str(label))
    return _build_split(images, labels, voc_indices(), (GREY, PALETTE), problems, on_corrupt,
                        _list_path(base, list_name))


def scan_voc(root: str | Path, train_list: str = "train", on_corrupt: str = "fail") -> SegLayout:
    base = voc_base(root)
    train_ids = set(_read_list(_list_path(base, train_list)))
    shared = sorted(train_ids & set(_read_list(_list_path(base, "val"))))
    if shared:
        raise DataError(f"VOC train list {_list_path(base, train_list)} holds {len(shared)} "
                        f"images of the val list (e.g. {shared[0]}): keep VOC val out of training")
    return SegLayout(str(base), list(voc_indices().classes),
                     scan_voc_split(base, train_list, on_corrupt),
                     scan_voc_split(base, "val", on_corrupt))


def scan_segmentation(cfg_data) -> SegLayout:
    """The layout named by ``data.layout`` under ``data.root``."""
    if cfg_data.layout == "cityscapes":
        return scan_cityscapes(cfg_data.root, cfg_data.on_corrupt)
    if cfg_data.layout == "voc":
        return scan_voc(cfg_data.root, cfg_data.voc_train_list, cfg_data.on_corrupt)
    raise ValueError(f"data.layout must be 'cityscapes' or 'voc' for segmentation, "
                     f"got {cfg_data.layout!r}")


def scan_split(cfg_data, split: str) -> PairSplit:
    """One split of the configured layout (Cityscapes: train / val / test; VOC: a list name)."""
    if cfg_data.layout == "cityscapes":
        return scan_cityscapes_split(cfg_data.root, split, cfg_data.on_corrupt)
    if cfg_data.layout == "voc":
        return scan_voc_split(cfg_data.root, split, cfg_data.on_corrupt)
    raise ValueError(f"data.layout must be 'cityscapes' or 'voc' for segmentation, "
                     f"got {cfg_data.layout!r}")
