"""Segmentation data: label tables, the synthetic Cityscapes tree, layout scans and their
errors, paired augmentation in both backends, sharding, resume, and official-format
predictions scored equal to Cityscapes' own evaluation.

Alignment trees are mosaics of flat blocks whose colour codes their label id: the codes are
the corners of the RGB cube [40, 215]³, so no blend of other codes (bilinear resizing mixes
neighbours with non-negative weights) comes within 2 grey levels of a code. A pixel whose
colour is a code must therefore carry that code's train id after any scale, crop and flip,
and a pixel of the zero padding must carry 255.
"""
from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as CS_LABELS, trainId2label
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, build_loaders
from pipeline.data.segmentation import build_eval_loader
from pipeline.data.segmentation.labels import (cityscapes_classes, cityscapes_label_ids,
                                               cityscapes_train_ids, palette_as_grey,
                                               train_id_to_label_id, voc_indices)
from pipeline.data.segmentation.layouts import scan_cityscapes
from pipeline.data.segmentation.predictions import write_cityscapes_prediction
from pipeline.data.segmentation.synth import CITIES, write_cityscapes_synth
from pipeline.tasks.segmentation import confusion_matrix, iou_from_confusion

pytestmark = pytest.mark.unit

BACKENDS = ("dali", "torchvision")
MOSAIC_IDS = (7, 8, 11, 21, 23, 26, 1, 4)   # road … car, and two ignored: ego vehicle, static
CODES = np.array(list(itertools.product((40, 215), repeat=3)), np.float32)
SIZES = ((48, 80), (40, 72))                # (height, width): two sizes in each split


# ---- trees -----------------------------------------------------------------------------------

def _mosaic(rng: np.random.Generator, height: int, width: int):
    """(image, label ids) of rows of random blocks 3–11 pixels high and wide."""
    label = np.zeros((height, width), np.uint8)
    top = 0
    while top < height:
        bottom, left = top + int(rng.integers(3, 12)), 0
        while left < width:
            right = left + int(rng.integers(3, 12))
            label[top:bottom, left:right] = rng.choice(MOSAIC_IDS)
            left = right
        top = bottom
    code = np.zeros(256, np.int64)
    code[list(MOSAIC_IDS)] = np.arange(len(MOSAIC_IDS))
    return CODES[code[label]].astype(np.uint8), label


def _write_pair(root: Path, split: str, city: str, index: int, image: np.ndarray,
                label: np.ndarray) -> tuple[Path, Path]:
    stem = f"{city}_{index:06d}_000019"
    paths = (root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
             root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    for path, array in zip(paths, (image, label)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    return paths


def _mosaic_tree(root: Path, train: int = 12, val: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            height, width = SIZES[i % 2]
            _write_pair(root, split, CITIES[split][i % 3], i, *_mosaic(rng, height, width))
    return root


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    return _mosaic_tree(tmp_path_factory.mktemp("mosaic"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "cityscapes"
    write_cityscapes_synth(root, size=(64, 32), count=10)
    return root


def _cfg(root, backend="dali", **kw) -> DataConfig:
    base = dict(root=str(root), layout="cityscapes", backend=backend, crop_size=[32, 64],
                scale_range=[0.5, 2.0], batch_size=4, val_batch_size=3, workers=0,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return DataConfig(**{**base, **kw})


def _loaders(root, backend="dali", rank=0, world_size=1, **kw):
    return build_loaders(_cfg(root, backend, **kw), rank=rank, world_size=world_size, seed=3,
                         device="cpu")


def _one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)


def _train_ids(label_file) -> np.ndarray:
    return cityscapes_label_ids().lut[np.asarray(Image.open(label_file))]


# ---- label tables ----------------------------------------------------------------------------

def test_label_id_table_is_cityscapesscripts_own():
    table = cityscapes_label_ids()
    for label in CS_LABELS:
        if label.id < 0:        # license plate: never in a label file
            continue
        expected = label.trainId if label.trainId not in (255, -1) else 255
        assert table.lut[label.id] == expected, label.name
        assert table.legal[label.id]
    assert table.legal.sum() == len([l for l in CS_LABELS if l.id >= 0]) == 34
    assert cityscapes_classes() == tuple(trainId2label[t].name for t in range(19))
    assert cityscapes_classes()[:3] == ("road", "sidewalk", "building")
    back = train_id_to_label_id()
    assert all(table.lut[back[t]] == t for t in range(19))
    assert cityscapes_train_ids().legal.sum() == 20 and voc_indices().legal.sum() == 22


def test_palette_png_retyped_as_grey_decodes_to_its_indices(tmp_path):
    from pipeline.data.segmentation.dali_pairs import read_label_png
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    indices = np.random.default_rng(0).integers(0, 21, (30, 40)).astype(np.uint8)
    indices[:4, :4] = 255
    image = Image.fromarray(indices).convert("P")
    image.putpalette(np.random.default_rng(1).integers(0, 256, 768).astype(np.uint8).tobytes())
    image.frombytes(indices.tobytes())
    image.save(tmp_path / "p.png", transparency=0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), indices)

    @pipeline_def
    def decode():
        data = fn.external_source(source=lambda: [read_label_png(str(tmp_path / "p.png"))])
        return fn.decoders.image(data, device="cpu", output_type=types.GRAY)

    pipe = decode(batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    assert np.array_equal(np.asarray(pipe.run()[0][0])[..., 0], indices)
    retyped = palette_as_grey((tmp_path / "p.png").read_bytes())
    assert b"PLTE" not in retyped and b"tRNS" not in retyped


# ---- the synthetic tree ----------------------------------------------------------------------

def test_synth_tree_has_cityscapes_layout_ids_and_instances(synth):
    scanned = scan_cityscapes(synth)
    assert (len(scanned.train), len(scanned.val)) == (10, 2)
    first = Path(scanned.train.images[0])
    assert first.name == "aachen_000000_000019_leftImg8bit.png"
    assert first.parent == synth / "leftImg8bit" / "train" / "aachen"
    assert scanned.train.sizes[0] == (32, 64)
    legal = cityscapes_label_ids().legal
    ids, classes = set(), set()
    for label_file in scanned.train.labels:
        label = np.asarray(Image.open(label_file))
        instance = np.asarray(Image.open(label_file.replace("labelIds", "instanceIds")))
        assert instance.dtype == np.uint16 and legal[label].all()
        ids |= set(np.unique(label).tolist())
        classes |= set(np.unique(cityscapes_label_ids().lut[label]).tolist())
        owner = np.where(instance >= 1000, instance // 1000, instance)
        assert np.array_equal(owner, label)      # instance ids are label id · 1000 + k
    assert {1, 2, 3} <= ids                      # ego vehicle, rectification border, out of roi
    assert {0, 1, 2, 5, 8, 10, 11, 13} <= classes
    test_labels = sorted((synth / "gtFine" / "test").rglob("*_labelIds.png"))
    assert len(test_labels) == 1
    assert set(np.unique(np.asarray(Image.open(test_labels[0]))).tolist()) <= {0, 1, 2, 3}
    with pytest.raises(FileExistsError):
        write_cityscapes_synth(synth, size=(64, 32), count=10)


def test_synth_cli_writes_the_tree_and_rejects_a_bad_size(tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "data", "cityscapes-synth"]
    done = subprocess.run(cmd + ["--out", str(tmp_path / "cs"), "--size", "48x24", "--count", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["train"], record["val"], record["test"]) == (3, 1, 1)
    with Image.open(next((tmp_path / "cs" / "leftImg8bit" / "val").rglob("*.png"))) as im:
        assert im.size == (48, 24)
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "x"), "--size", "48by24"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--size must be WxH" in bad.stderr
    assert not (tmp_path / "x").exists()


# ---- augmentation: alignment, backends, photometric ------------------------------------------

def _check_alignment(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Asserts code-coloured pixels carry their train id and padding 255; returns the share
    of pixels checked either way and the share of padding."""
    pixels = images.permute(0, 2, 3, 1).numpy() * 255
    labels = labels.numpy()
    distance = np.abs(pixels[..., None, :] - CODES).max(-1)
    exact = distance.min(-1) <= 2.0
    lut = cityscapes_label_ids().lut
    expected = lut[np.array(MOSAIC_IDS)][distance.argmin(-1)]
    assert np.array_equal(labels[exact], expected[exact])
    pad = (pixels == 0).all(-1)
    assert (labels[pad] == 255).all()
    return float((exact | pad).mean()), float(pad.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_stay_aligned_through_scale_crop_pad_and_flip(mosaic, backend):
    train, val = _loaders(mosaic, backend)
    checked, padded = [], []
    for epoch in range(3):
        for images, labels in train.epoch(epoch):
            assert images.shape == (4, 3, 32, 64) and labels.shape == (4, 32, 64)
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            share, pad = _check_alignment(images, labels)
            checked.append(share)
            padded.append(pad)
    assert np.mean(checked) > 0.6 and max(padded) > 0.05   # the checks were not vacuous
    for images, labels in val:                              # whole images, padded to the largest
        assert images.shape[2:] == SIZES[0] and _check_alignment(images, labels)[0] > 0.8


def test_backends_give_the_same_labels_and_images_within_a_grey_level(mosaic):
    dali, _ = _loaders(mosaic, "dali")
    tv, _ = _loaders(mosaic, "torchvision")
    for (x_dali, y_dali), (x_tv, y_tv) in zip(dali.epoch(1), tv.epoch(1)):
        assert torch.equal(y_dali, y_tv)
        assert ((x_dali - x_tv).abs() * 255).max() <= 1.01     # rounding of the bilinear resize


@pytest.mark.parametrize("backend", BACKENDS)
def test_photometric_distortion_changes_images_only(mosaic, backend):
    plain, _ = _loaders(mosaic, backend)
    distorted, _ = _loaders(mosaic, backend, photometric=True)
    diffs = []
    for (x0, y0), (x1, y1) in zip(plain.epoch(0), distorted.epoch(0)):
        assert torch.equal(y0, y1)
        pad = (x0 == 0).all(1, keepdim=True).expand_as(x0)
        assert (x1[pad] == 0).all()                             # applied before the padding
        diffs.append(((x1 - x0).abs() * 255).mean().item())
    assert max(diffs) > 5


def test_photometric_distortion_gives_the_same_pixels_in_both_backends(mosaic):
    dali, _ = _loaders(mosaic, "dali", photometric=True)
    tv, _ = _loaders(mosaic, "torchvision", photometric=True)
    for (x_dali, _), (x_tv, _) in zip(dali.epoch(0), tv.epoch(0)):
        levels = (x_dali - x_tv).abs() * 255
        # the resize's ±1 level, then three uint8 roundings with gains up to ~1.5
        assert levels.max() <= 4.01 and levels.mean() < 0.5


# ---- order, resume, sharding -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_epoch_yields_the_uninterrupted_batches(mosaic, backend):
    train, _ = _loaders(mosaic, backend, photometric=True)
    full = list(train.epoch(2))
    again, _ = _loaders(mosaic, backend, photometric=True)
    resumed = list(again.epoch(2, start_step=1))
    assert len(full) == len(train) == 3 and len(resumed) == 2
    for (x0, y0), (x1, y1) in zip(full[1:], resumed):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    other = list(train.epoch(3))
    assert not torch.equal(full[0][1], other[0][1])       # a new epoch, new windows


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_read_every_val_image_once_in_their_file_order(synth, backend):
    seen = []
    for rank in range(2):
        _, val = _loaders(synth, backend, rank=rank, world_size=2, val_batch_size=1)
        assert val.num_samples == 2 and len(val) == 1
        files = val.image_files
        batches = list(val)
        assert len(batches) == len(files) == 1
        for (images, labels), image_file in zip(batches, files):
            label_file = image_file.replace("leftImg8bit/", "gtFine/").replace(
                "_leftImg8bit.png", "_gtFine_labelIds.png")
            assert images.shape == (1, 3, 32, 64)
            assert np.array_equal(labels[0].numpy(), _train_ids(label_file))
        seen += files
    assert sorted(seen) == sorted(scan_cityscapes(synth).val.images)


def test_val_batches_of_different_sizes_are_padded_with_ignore(mosaic):
    for backend in BACKENDS:
        _, val = _loaders(mosaic, backend, val_batch_size=2)
        images, labels = next(iter(val))
        assert images.shape == (2, 3, *SIZES[0])
        small = val.image_files[1]
        assert Image.open(small).size == SIZES[1][::-1]
        assert (labels[1, SIZES[1][0]:] == 255).all() and (labels[1, :, SIZES[1][1]:] == 255).all()
        assert (images[1, :, SIZES[1][0]:] == 0).all()


# ---- bad input -------------------------------------------------------------------------------

@pytest.fixture
def small_tree(tmp_path) -> Path:
    return _mosaic_tree(tmp_path / "cs", train=8, val=2)


def _label_of(image: Path) -> Path:
    return Path(str(image).replace("leftImg8bit/", "gtFine/").replace(
        "_leftImg8bit.png", "_gtFine_labelIds.png"))


def _first_train_image(root: Path) -> Path:
    return sorted((root / "leftImg8bit" / "train").rglob("*.png"))[0]


def test_image_without_label_and_label_without_image(small_tree):
    image = _first_train_image(small_tree)
    label = _label_of(image)
    label.rename(label.with_suffix(".bak"))
    with pytest.raises(DataError) as err:
        _loaders(small_tree)
    _one_line_error(err, "no label for image", image, label)
    train, _ = _loaders(small_tree, on_corrupt="skip")
    assert train.num_samples == 7 and train.skipped == [str(image)]
    label.with_suffix(".bak").rename(label)
    image.rename(image.with_suffix(".bak"))
    with pytest.raises(DataError) as err:
        _loaders(small_tree)
    _one_line_error(err, "label without image", label)


def test_label_of_another_size_and_rgb_label(small_tree):
    label = _label_of(_first_train_image(small_tree))
    Image.open(label).resize((20, 10), Image.Resampling.NEAREST).save(label)
    with pytest.raises(DataError) as err:
        _loaders(small_tree)
    _one_line_error(err, "label size 20x10 differs from its image's", label)
    Image.new("RGB", SIZES[0][::-1]).save(label)
    with pytest.raises(DataError) as err:
        _loaders(small_tree)
    _one_line_error(err, "holds 8-bit RGB pixels, expected 8-bit greyscale", label)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_id_outside_the_table_fails_or_is_ignored(small_tree, backend):
    images = sorted((small_tree / "leftImg8bit" / "train").rglob("*.png"))
    label = _label_of(images[3])
    values = np.asarray(Image.open(label)).copy()
    values[:2, :2] = 40                                   # Cityscapes ids end at 33
    Image.fromarray(values).save(label)
    train, _ = _loaders(small_tree, backend, scale_range=[1.0, 1.0])
    with pytest.raises(DataError) as err:
        list(train.epoch(0))
    _one_line_error(err, "label values [40] outside the table", "0–33", label)
    train, _ = _loaders(small_tree, backend, scale_range=[1.0, 1.0], on_corrupt="skip")
    ignored = [(y == 255).flatten(1).all(1) for _, y in train.epoch(0)]
    assert torch.cat(ignored).sum() == 1 and len(train.skipped_at_decode) == 1
    assert train.source.skips == {str(label)} and train.skipped == []


def _voc_tree(root: Path, rgb_label: bool = False) -> Path:
    """VOC2012 with palette labels, one train label only in SegmentationClassAug (greyscale,
    listed in train_aug.txt), and optionally an RGB label."""
    rng = np.random.default_rng(1)
    lists = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"],
             "train_aug": ["2007_000001", "2007_000002", "2008_000004"]}
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                   "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in sorted(set(sum(lists.values(), []))):
        indices = rng.integers(0, 21, (24, 30)).astype(np.uint8)
        Image.fromarray(rng.integers(0, 255, (24, 30, 3)).astype(np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg")
        if name.startswith("2008"):     # SBD: greyscale index PNGs
            Image.fromarray(indices).save(root / "SegmentationClassAug" / f"{name}.png")
            continue
        label = Image.fromarray(indices).convert("P")
        label.frombytes(indices.tobytes())
        (label.convert("RGB") if rgb_label and name == "2007_000002" else label).save(
            root / "SegmentationClass" / f"{name}.png")
    for split, names in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_voc_palette_and_aug_labels_read_as_indices_and_rgb_label_rejected(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    for backend in BACKENDS:
        cfg = _cfg(tmp_path, backend, layout="voc", batch_size=3, voc_train_list="train_aug",
                   scale_range=[1.0, 1.0], crop_size=[24, 30])
        train, val = build_loaders(cfg, rank=0, world_size=1, seed=0)  # ROOT = VOCdevkit works
        assert train.num_classes == 21 and train.classes[15] == "person"
        (_, labels), = list(val)
        expected = np.asarray(Image.open(root / "SegmentationClass" / "2007_000003.png"))
        assert np.array_equal(labels[0].numpy(), expected)
        (_, labels), = list(train.epoch(0))       # whole images, maybe flipped
        for name in ("2007_000001", "2008_000004"):
            folder = "SegmentationClassAug" if name.startswith("2008") else "SegmentationClass"
            expected = torch.from_numpy(np.array(Image.open(root / folder / f"{name}.png")))
            assert any(torch.equal(y, expected) or torch.equal(y, expected.flip(-1))
                       for y in labels.to(torch.uint8))
    bad = _voc_tree(tmp_path / "bad" / "VOC2012", rgb_label=True)
    with pytest.raises(DataError) as err:
        build_loaders(_cfg(bad, layout="voc", batch_size=2), rank=0, world_size=1, seed=0)
    _one_line_error(err, "holds 8-bit RGB pixels, expected 8-bit greyscale or palette",
                    bad / "SegmentationClass" / "2007_000002.png")
    (bad / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000003\n")
    with pytest.raises(DataError) as err:
        build_loaders(_cfg(bad, layout="voc", batch_size=2), rank=0, world_size=1, seed=0)
    _one_line_error(err, "holds 1 images of the val list (e.g. 2007_000003)")


# ---- predictions in the official format ------------------------------------------------------

def test_our_miou_equals_the_official_cityscapes_evaluation(synth, tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    loader = build_eval_loader(_cfg(synth, val_batch_size=1), "val", rank=0, world_size=1)
    rng = np.random.default_rng(0)
    matrix = torch.zeros(19, 19, dtype=torch.long)
    predictions, truths = [], []
    for (_, target), image_file in zip(loader, loader.image_files):
        target = target[0]
        pred = target.clone()
        pred[target == 255] = torch.from_numpy(rng.integers(0, 19, int((target == 255).sum())))
        noise = torch.from_numpy(rng.random(target.shape) < 0.2)
        pred[noise] = torch.from_numpy(rng.integers(0, 19, int(noise.sum())))
        pred[pred == 11] = 13                 # people read as cars
        pred[:4, :4] = 17                     # a class absent from the ground truth
        matrix += confusion_matrix(pred[None], target[None], 19)
        path = write_cityscapes_prediction(pred, image_file, tmp_path / "results")
        assert path.name.endswith("_pred_labelIds.png") and path.name.startswith(
            Path(image_file).name[:-len("_leftImg8bit.png")])
        predictions.append(str(path))
        truths.append(str(_label_of(Path(image_file))))
    iou, miou, _ = iou_from_confusion(matrix)
    args = copy.copy(official.args)
    # iIoU off: its category masks use np.in1d, gone in NumPy 2.4; pixel IoUs do not need it
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, False
    result = official.evaluateImgLists(predictions, truths, args)
    assert abs(result["averageScoreClasses"] - miou) < 1e-6
    for train_id, value in enumerate(iou):
        theirs = result["classScores"][trainId2label[train_id].name]
        assert (np.isnan(value) and np.isnan(theirs)) or abs(value - theirs) < 1e-6
    assert 0.2 < miou < 0.9
