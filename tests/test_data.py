"""The data layer: digits writer, layout errors, corrupt files, sharding, order, resume, recipes.

Most tests use a tiny tree whose every image is one flat grey level coding its index, so the
sample identity survives decoding, cropping, resizing and flipping and can be read back from
the batch: ``id = round((255 · mean(pixel) - BASE) / STEP)`` (normalisation mean 0, std 1).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, build_loaders
from pipeline.data.digits import write_digits
from pipeline.data.index import scan
from pipeline.data.recipe import DRAWS, recipe_from_config, sample_draws, train_crops

pytestmark = pytest.mark.unit

CLASSES = ("ant", "bee", "cat")
TRAIN_PER_CLASS, VAL_PER_CLASS = 14, 5
BASE, STEP = 20, 5
BACKENDS = ("dali", "torchvision")


def _flat_jpeg(path: Path, level: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (level, level, level)).save(path, quality=95)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ROOT/{train,val}/<class>/<id>.jpg; image id i (per split, in scan order) has level BASE+STEP·i."""
    root = tmp_path_factory.mktemp("tree")
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            for k in range(per_class):
                i = c * per_class + k
                _flat_jpeg(root / split / name / f"{i:03d}.jpg", BASE + STEP * i)
    return root


def _cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), recipe="imagenet", image_size=16, batch_size=4,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], workers=0)
    return DataConfig(**{**base, **kw})


def _ids(images: torch.Tensor) -> list[int]:
    levels = images.mean(dim=(1, 2, 3)) * 255
    return torch.round((levels - BASE) / STEP).long().tolist()


def _epoch_ids(loader, epoch, start_step=0) -> list[list[int]]:
    return [_ids(x) for x, _ in loader.epoch(epoch, start_step)]


def _one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---- embedded digits -------------------------------------------------------------------------

def test_digits_writer_counts_shape_classes_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "digits"
    counts = write_digits(out)
    assert (counts["train"], counts["val"], counts["classes"]) == (1437, 360, 10)
    for split in ("train", "val"):
        assert sorted(os.listdir(out / split)) == [str(d) for d in range(10)]
    per_class_val = [len(os.listdir(out / "val" / str(d))) for d in range(10)]
    assert sum(per_class_val) == 360 and min(per_class_val) >= 34   # stratified: ~36 each
    with Image.open(next((out / "train" / "3").iterdir())) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        assert np.asarray(im).max() > 200   # scaled from 0..16 to 0..255
    with pytest.raises(FileExistsError):
        write_digits(out)
    assert sorted(os.listdir(tmp_path)) == ["digits"]   # no temp dirs left behind


def test_digits_split_is_seeded(tmp_path):
    a = write_digits(tmp_path / "a", size=8)
    b = write_digits(tmp_path / "b", size=8)
    assert a["val"] == b["val"]
    assert sorted(os.listdir(tmp_path / "a" / "val" / "7")) == \
        sorted(os.listdir(tmp_path / "b" / "val" / "7"))


# ---- layout errors ---------------------------------------------------------------------------

def _small_tree(root: Path, val_classes=CLASSES, empty: str | None = None) -> Path:
    for split, names in (("train", CLASSES), ("val", val_classes)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            if not (split == "train" and name == empty):
                _flat_jpeg(root / split / name / "0.jpg", 100)
    return root


def test_missing_root(tmp_path):
    with pytest.raises(DataError) as e:
        scan(tmp_path / "nowhere")
    _one_line_error(e, "data root not found", str(tmp_path / "nowhere"))


def test_missing_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    _one_line_error(e, "missing split folder", str(tmp_path / "val"))


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    _one_line_error(e, "no class folders", str(tmp_path / "train"))


def test_empty_class_folder(tmp_path):
    _small_tree(tmp_path, empty="bee")
    (tmp_path / "train" / "bee" / ".DS_Store").write_bytes(b"hidden files do not count")
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    _one_line_error(e, "empty class folder", str(tmp_path / "train" / "bee"))


def test_val_classes_must_match_train(tmp_path):
    _small_tree(tmp_path, val_classes=("ant", "bee", "dog"))
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    _one_line_error(e, "differ from train", "cat", "dog")


def test_too_few_images_for_a_global_batch(tmp_path):
    _small_tree(tmp_path)
    with pytest.raises(DataError) as e:
        build_loaders(_cfg(tmp_path, batch_size=4), rank=0, world_size=1, seed=0)
    _one_line_error(e, "fewer than one global batch", "batch_size=4")


# ---- corrupt files ---------------------------------------------------------------------------

def _tree_with_bad_files(root: Path) -> dict[str, Path]:
    _small_tree(root)
    for name in CLASSES:
        for k in range(1, 4):
            _flat_jpeg(root / "train" / name / f"{k}.jpg", 50 * k)
    good = (root / "train" / "ant" / "1.jpg").read_bytes()
    bad = {"text": root / "train" / "bee" / "notes.jpg",
           "truncated": root / "train" / "cat" / "cut.jpg",
           "empty": root / "val" / "ant" / "zero.jpg"}
    bad["text"].write_text("not an image")
    bad["truncated"].write_bytes(good[:len(good) // 2])
    bad["empty"].write_bytes(b"")
    return bad


def test_corrupt_file_fails_naming_it(tmp_path):
    bad = _tree_with_bad_files(tmp_path)
    with pytest.raises(DataError) as e:
        build_loaders(_cfg(tmp_path, batch_size=2), rank=0, world_size=1, seed=0)
    _one_line_error(e, "corrupt or non-image file", str(bad["text"]), "on_corrupt=skip")


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_skipped_and_counted(tmp_path, backend):
    bad = _tree_with_bad_files(tmp_path)
    train, val = build_loaders(_cfg(tmp_path, batch_size=2, backend=backend, on_corrupt="skip"),
                               rank=0, world_size=1, seed=0)
    assert sorted(train.skipped + val.skipped) == sorted(map(str, bad.values()))
    assert train.num_samples == 12 and val.num_samples == 3
    assert sum(len(y) for _, y in train.epoch(0)) == 12
    assert sum(len(y) for _, y in val) == 3


def _corrupt_kinds(good: bytes) -> dict[str, bytes]:
    """Corrupt files made from the valid JPEG ``good`` (a flat grey image)."""
    sos = good.find(b"\xff\xda")
    body = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")   # first byte of image data
    mid = (body + len(good)) // 2
    dht = good.find(b"\xff\xc4")
    gif = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(gif, "GIF")
    return {
        "empty": b"",
        "text": b"not an image\n",
        "truncated": good[:mid],
        "gif named .jpg": gif.getvalue(),
        # intact JPEG header and EOI, garbage between
        "garbage body": good[:20] + np.random.default_rng(0).bytes(400) + b"\xff\xd9",
        # a marker libjpeg (PIL) stops on and DALI's CPU decoder decodes through
        "mid-stream damage": good[:mid] + b"\xff\x6e" + good[mid + 2:],
        # well-formed markers, broken table: both decoders refuse it
        "bad huffman table": good[:dht + 5] + b"\xff" * 16 + good[dht + 21:],
        # truncated data with EOI appended: every decoder fills the missing rows, silently
        "fake end marker": good[:mid] + b"\xff\xd9",
    }


CORRUPT_KINDS = ["empty", "text", "truncated", "gif named .jpg", "garbage body",
                 "mid-stream damage", "bad huffman table", "fake end marker"]
SCAN_TIME = {"empty", "text", "truncated", "gif named .jpg"}
DECODED_EVERYWHERE = {"fake end marker"}


def _tree_with_one_bad_file(root: Path, data: bytes) -> list[Path]:
    """3 classes × 3 train images (ids 0–8) and 1 val image each (ids 0–2), plus ``data`` as a
    fourth train image of 'bee' and a second val image of 'cat'."""
    for c, name in enumerate(CLASSES):
        for k in range(3):
            _flat_jpeg(root / "train" / name / f"{k}.jpg", BASE + STEP * (3 * c + k))
        _flat_jpeg(root / "val" / name / "0.jpg", BASE + STEP * c)
    bad = [root / "train" / "bee" / "bad.jpg", root / "val" / "cat" / "bad.jpg"]
    for path in bad:
        path.write_bytes(data)
    return bad


@pytest.mark.parametrize("kind", CORRUPT_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_kind_of_corrupt_file_ends_the_same_way_in_both_backends(tmp_path, backend, kind):
    _flat_jpeg(tmp_path / "good.jpg", 100)
    data = _corrupt_kinds((tmp_path / "good.jpg").read_bytes())[kind]
    bad = [str(p) for p in _tree_with_one_bad_file(tmp_path / "tree", data)]
    cfg = partial(_cfg, tmp_path / "tree", backend=backend, batch_size=2, val_batch_size=2)

    # skip: dropped at scan time, or replaced in its batch by another image of that batch
    train, val = build_loaders(cfg(on_corrupt="skip"), rank=0, world_size=1, seed=0)
    batches = _epoch_ids(train, 0)
    val_ids = [_ids(x) for x, _ in val]
    if kind in SCAN_TIME:
        assert train.skipped + val.skipped == bad
        assert len(batches) == 4 and val_ids == [[0, 1], [2]]
    else:
        assert train.skipped + val.skipped == [] and len(batches) == 5
        assert all(len(ids) == 2 for ids in batches)
    if kind in SCAN_TIME | DECODED_EVERYWHERE:
        assert train.skipped_at_decode == val.skipped_at_decode == set()
    else:
        assert len(train.skipped_at_decode) == len(val.skipped_at_decode) == 1
        assert sorted(set(sum(batches, []))) == list(range(9))   # every good image, no other
        assert sum(ids[0] == ids[1] for ids in batches) == 1        # the stand-in's batch
        assert val_ids == [[0, 1], [2, 2]]
        assert _epoch_ids(train, 0) == batches   # a later pass drops it again, the same way

    # fail: a one-line error naming the file, at scan or at decode time
    if kind in SCAN_TIME:
        with pytest.raises(DataError) as e:
            build_loaders(cfg(on_corrupt="fail"), rank=0, world_size=1, seed=0)
        _one_line_error(e, "corrupt or non-image file", bad[0])
        return
    # (worker processes once: a DataLoader whose worker raised takes ~5 s per worker to close)
    workers = {"dali": 1, "torchvision": 2 if kind == "mid-stream damage" else 0}[backend]
    train, val = build_loaders(cfg(on_corrupt="fail", workers=workers), rank=0, world_size=1,
                               seed=0)
    if kind in DECODED_EVERYWHERE:
        assert len(_epoch_ids(train, 0)) == 5 and len(list(val)) == 2
        return
    for loader, path in ((train.epoch(0), bad[0]), (val, bad[1])):
        with pytest.raises(DataError) as e:
            list(loader)
        _one_line_error(e, "cannot decode image", path)


# ---- sharding, order, resume -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_val_shards_cover_every_image_once(tree, backend):
    seen, labels = [], []
    for rank in (0, 1):
        _, val = build_loaders(_cfg(tree, backend=backend, val_batch_size=4), rank=rank,
                               world_size=2, seed=0)
        assert val.num_samples == 15
        batches = list(val)
        assert len(batches) == len(val)
        seen += [i for x, _ in batches for i in _ids(x)]
        labels += [y for _, ys in batches for y in ys.tolist()]
    assert sorted(seen) == list(range(15))
    assert labels == [i // VAL_PER_CLASS for i in seen]


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shards_disjoint_equal_and_labelled(tree, backend):
    shards = []
    for rank in (0, 1):
        train, _ = build_loaders(_cfg(tree, backend=backend), rank=rank, world_size=2, seed=3)
        assert len(train) == 42 // (2 * 4) and train.num_classes == 3
        batches = list(train.epoch(1))
        assert len(batches) == len(train)
        for x, y in batches:
            assert y.tolist() == [i // TRAIN_PER_CLASS for i in _ids(x)]
        shards.append([i for x, _ in batches for i in _ids(x)])
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0]) & set(shards[1])


def test_both_backends_read_the_same_order(tree):
    orders = []
    for backend in BACKENDS:
        train, val = build_loaders(_cfg(tree, backend=backend), rank=1, world_size=2, seed=5)
        orders.append((_epoch_ids(train, 2), [_ids(x) for x, _ in val]))
    assert orders[0] == orders[1]


def test_reshuffle_per_epoch_is_seeded(tree):
    train, _ = build_loaders(_cfg(tree), rank=0, world_size=1, seed=7)
    again, _ = build_loaders(_cfg(tree), rank=0, world_size=1, seed=7)
    other, _ = build_loaders(_cfg(tree), rank=0, world_size=1, seed=8)
    e0, e1 = _epoch_ids(train, 0), _epoch_ids(train, 1)
    assert e0 != e1
    for ids in (sum(e0, []), sum(e1, [])):   # 40 of the 42 images, each at most once
        assert len(set(ids)) == 40 and set(ids) <= set(range(42))
    assert _epoch_ids(again, 1) == e1
    assert _epoch_ids(other, 1) != e1


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_reads_exactly_the_remaining_batches(tree, backend):
    train, _ = build_loaders(_cfg(tree, backend=backend), rank=0, world_size=1, seed=1)
    full = _epoch_ids(train, 4)
    assert _epoch_ids(train, 4, start_step=6) == full[6:]
    assert _epoch_ids(train, 4, start_step=len(train)) == []


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> Path:
    """3 classes × 8 train images of random texture (so that crops and flips show), 1 val each."""
    root = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                pixels = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).resize((48, 36), Image.Resampling.BICUBIC).save(
                    root / split / name / f"{k}.jpg", quality=95)
    return root


RESUMED = r"""
import sys, torch
from pipeline.config import DataConfig
from pipeline.data import build_loaders
root, backend, out = sys.argv[1:4]
cfg = DataConfig(root=root, backend=backend, recipe="imagenet", image_size=16, batch_size=2,
                 mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], workers=2, scale=[0.2, 1.0])
train, _ = build_loaders(cfg, rank=1, world_size=2, seed=3)
torch.save(list(train.epoch(2, start_step=3)), out)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_is_bit_identical_with_the_augmentation(textured, backend, tmp_path):
    """Batches k… of an epoch read from start_step k — in this process and in a restarted one
    — equal those of the uninterrupted epoch exactly, random crops and flips included."""
    cfg = _cfg(textured, backend=backend, batch_size=2, workers=2, scale=[0.2, 1.0])
    train, _ = build_loaders(cfg, rank=1, world_size=2, seed=3)
    full = list(train.epoch(2))
    assert len(full) == 6
    resumed = list(train.epoch(2, start_step=3))
    subprocess.run([sys.executable, "-c", RESUMED, str(textured), backend,
                    str(tmp_path / "resumed.pt")], check=True, env={**os.environ,
                                                                    "OMP_NUM_THREADS": "1"})
    restarted = torch.load(tmp_path / "resumed.pt")
    for batches in (resumed, restarted):
        assert len(batches) == 3
        for (x, y), (xr, yr) in zip(full[3:], batches):
            assert torch.equal(x, xr) and torch.equal(y, yr)
    if backend == "torchvision":   # nor does it depend on the worker processes
        single, _ = build_loaders(_cfg(textured, backend=backend, batch_size=2, workers=0,
                                       scale=[0.2, 1.0]), rank=1, world_size=2, seed=3)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(full, single.epoch(2)))


# ---- recipes ---------------------------------------------------------------------------------

MEAN, STD = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]


def _expected(level: int) -> torch.Tensor:
    return (level / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe,size", [("imagenet", 16), ("cifar", 24)])
def test_recipe_shapes_dtypes_and_normalisation(tree, backend, recipe, size):
    cfg = _cfg(tree, backend=backend, recipe=recipe, image_size=size, mean=MEAN, std=STD,
               val_batch_size=5)
    train, val = build_loaders(cfg, rank=0, world_size=1, seed=0)
    x, y = next(iter(train.epoch(0)))
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64 and x.device.type == "cpu"
    xv, yv = next(iter(val))
    assert xv.shape == (5, 3, size, size) and yv.tolist() == [0] * 5
    # Validation is deterministic: val image i is flat at level BASE + STEP·i.
    for i in range(5):
        want = _expected(BASE + STEP * i).view(3, 1, 1).expand(3, size, size)
        assert torch.allclose(xv[i], want, atol=3 / 255 / min(STD))
    # Training crops of a flat image hold its level, plus (cifar) zero padding, nothing else.
    black = _expected(0).view(1, 3, 1, 1)
    for image in x:
        padded = torch.isclose(image, black[0], atol=1e-4).all(dim=0)
        content = image[:, ~padded]
        assert recipe == "cifar" or not padded.any()
        assert torch.allclose(content, content[:, :1].expand_as(content), atol=3 / 255 / min(STD))


def test_sample_draws_depend_only_on_key_and_index():
    draws = sample_draws(7, [3, 9, 4])
    assert draws.shape == (3, DRAWS) and ((draws >= 0) & (draws < 1)).all()
    assert np.array_equal(draws[1], sample_draws(7, [9])[0])
    assert not np.array_equal(draws[1], sample_draws(8, [9])[0])
    assert not np.array_equal(draws[1], draws[2])


def test_train_crops_follow_the_recipes():
    rng = np.random.default_rng(0)
    n = 4000
    sizes = rng.integers(1, 400, (n, 2))
    draws = sample_draws(1, range(n))
    recipe = recipe_from_config(_cfg(".", recipe="imagenet", scale=[0.08, 1.0],
                                     ratio=[0.75, 4 / 3], image_size=16))
    c = train_crops(recipe, draws, sizes)
    width, height = sizes[:, 0], sizes[:, 1]
    assert ((c.w >= 1) & (c.h >= 1) & (c.x >= 0) & (c.y >= 0)).all()
    assert ((c.x + c.w <= width) & (c.y + c.h <= height)).all()
    # A try that fits keeps its area and aspect ratio (up to rounding to whole pixels); images
    # too small or too narrow for every try get the centred fallback.
    tried = (c.w * c.h < width * height) & (width >= 20) & (height >= 20)
    area = c.w * c.h / (width * height)
    assert (area[tried] >= 0.08 * 0.8).all() and tried.mean() > 0.5
    aspect = c.w / c.h
    assert ((aspect[tried] > 0.75 * 0.85) & (aspect[tried] < 4 / 3 / 0.85)).all()
    assert 0.45 < c.flip.mean() < 0.55
    wide = train_crops(recipe, draws[:1], [(3000, 10)])   # no try fits: h >= 42 > 10
    assert (wide.w[0], wide.h[0], wide.x[0], wide.y[0]) == (13, 10, 1493, 0)

    cifar = recipe_from_config(_cfg(".", recipe="cifar", image_size=32, pad=4))
    c = train_crops(cifar, draws, np.full((n, 2), 32))
    assert (c.w == 32).all() and (c.h == 32).all()
    assert c.x.min() == c.y.min() == -4 and c.x.max() == c.y.max() == 4
