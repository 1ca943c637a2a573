"""The scan index: written once, reused while the tree is unchanged, updated per changed folder,
built by one of several concurrent starts, and the `pipeline data index / check` commands."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.data.index as index
from pipeline.config import DataConfig
from pipeline.data import DataError, build_loaders, build_val_loader
from pipeline.data.index import INDEX_NAME, current_listing, scan

pytestmark = pytest.mark.unit

CLASSES = ("ant", "bee", "cat")


def _jpeg(path: Path, level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (level, level, level)).save(path, quality=90)


def _age(root: Path, seconds: float = 60) -> None:
    """Date every folder of the tree back: mtimes as a tree written a minute ago has (the index
    does not trust folders changed within its timestamp granularity of the listing)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    for split, per_class in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for k in range(per_class):
                _jpeg(root / split / name / f"{k}.jpg", 40 * c + 10 * k)
    (root / "train" / "bee" / "notes.jpg").write_text("not an image")
    _age(root)
    return root


@pytest.fixture
def checks(monkeypatch) -> list[str]:
    """The files the scan-time check opens."""
    opened: list[str] = []
    original = index.check_file
    monkeypatch.setattr(index, "check_file", lambda p: opened.append(p) or original(p))
    return opened


def test_written_once_then_reused_without_opening_files(tree, tmp_path, checks):
    run = tmp_path / "run"
    first, how = current_listing(str(tree), run)
    assert how == "listed" and len(checks) == 19 and (run / INDEX_NAME).is_file()
    checks.clear()
    again, how = current_listing(str(tree), run)
    assert how == "index" and checks == []
    assert again.classes == first.classes == list(CLASSES)
    for split in ("train", "val"):
        for a, b in zip(first.folders[split], again.folders[split]):
            assert a.names == b.names and a.mtime == b.mtime
            assert np.array_equal(a.sizes, b.sizes) and np.array_equal(a.readable, b.readable)
    layout = scan(tree, on_corrupt="skip", index_dir=run)   # the corrupt verdict is kept
    assert layout.train.skipped == [str(tree / "train" / "bee" / "notes.jpg")]
    assert len(layout.train) == 12 and len(layout.val) == 6 and checks == []
    with pytest.raises(DataError, match="corrupt or non-image file: .*notes.jpg"):
        scan(tree, index_dir=run)


def test_a_changed_folder_is_listed_again_and_only_its_new_files_checked(tree, tmp_path, checks):
    run = tmp_path / "run"
    current_listing(str(tree), run)
    checks.clear()
    _jpeg(tree / "train" / "cat" / "new.jpg", 200)
    (tree / "val" / "ant" / "1.jpg").unlink()
    _age(tree)
    listing, how = current_listing(str(tree), run)
    assert how == "updated" and checks == [str(tree / "train" / "cat" / "new.jpg")]
    assert listing.folders["train"][2].names == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "new.jpg"]
    assert listing.folders["val"][0].names == ["0.jpg"]
    checks.clear()
    assert current_listing(str(tree), run)[1] == "index" and checks == []


def test_a_rewritten_file_in_a_changed_folder_is_checked_again(tree, tmp_path, checks):
    run = tmp_path / "run"
    current_listing(str(tree), run)
    broken = tree / "train" / "ant" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:40])          # same name, new size and mtime
    (tree / "train" / "ant" / "extra.txt").write_text("x")   # changes the folder's mtime
    _age(tree)
    checks.clear()
    layout = scan(tree, on_corrupt="skip", index_dir=run)
    assert sorted(checks) == sorted(map(str, [broken, tree / "train" / "ant" / "extra.txt"]))
    assert str(broken) in layout.train.skipped


def test_a_folder_changed_at_listing_time_is_not_trusted(tree, tmp_path, checks):
    run = tmp_path / "run"
    os.utime(tree / "val" / "bee")   # now: within the filesystem's timestamp granularity
    current_listing(str(tree), run)
    checks.clear()
    how = current_listing(str(tree), run)[1]
    assert how == "updated" and checks == []   # listed again; its files' verdicts kept
    _age(tree)   # settled (and so changed once more): listed again, then trusted
    assert [current_listing(str(tree), run)[1] for _ in range(2)] == ["updated", "index"]


def test_a_damaged_or_foreign_index_is_rebuilt(tree, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / INDEX_NAME).write_bytes(b"not an index")
    assert current_listing(str(tree), run)[1] == "listed"
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train", "val"):
        (other / name / "x").mkdir(parents=True)
        _jpeg(other / name / "x" / "0.jpg", 9)
    _age(other)
    listing, how = current_listing(str(other), run)   # the index in run/ is of another root
    assert how == "listed" and listing.classes == ["x"]


def test_the_index_of_root_is_found_and_an_unwritable_index_dir_is_only_a_warning(
        tree, tmp_path, caplog):
    current_listing(str(tree), tree)   # what `pipeline data index ROOT` writes
    assert current_listing(str(tree))[1] == "index"
    assert current_listing(str(tree), tmp_path / "run")[1] == "index"
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a folder")
    (tree / INDEX_NAME).unlink()
    listing, how = current_listing(str(tree), blocked / "run")
    assert how == "listed" and listing.classes == list(CLASSES)
    assert "cannot write the scan index" in caplog.text


def _start(args) -> str:
    root, run = args
    return current_listing(root, run)[1]


def test_concurrent_starts_list_the_tree_once(tree, tmp_path):
    """Ranks starting together (no process group yet): one lists and writes, the rest read."""
    with multiprocessing.get_context("fork").Pool(4) as pool:
        hows = pool.map(_start, [(str(tree), str(tmp_path / "run"))] * 4)
    assert sorted(hows) == ["index", "index", "index", "listed"]


def test_build_loaders_and_build_val_loader_use_the_index(tree, tmp_path, checks):
    run = tmp_path / "run"
    cfg = DataConfig(root=str(tree), batch_size=2, image_size=8, workers=0, on_corrupt="skip")
    train, val = build_loaders(cfg, rank=0, world_size=1, seed=0, index_dir=run)
    assert (run / INDEX_NAME).is_file() and len(checks) == 19
    assert train.num_samples == 12 and val.classes == list(CLASSES)
    checks.clear()
    val = build_val_loader(cfg, rank=1, world_size=2, index_dir=run)
    assert checks == [] and val.num_samples == 6 and len(val.shard) == 3
    (run / INDEX_NAME).unlink()
    val = build_val_loader(cfg, rank=0, world_size=1)   # no index: the val split alone
    assert len(checks) == 6 and val.classes == list(CLASSES)


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "data", *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_index_and_check(tree):
    good = (tree / "val" / "cat" / "0.jpg").read_bytes()
    sos = good.find(b"\xff\xda")
    mid = (sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big") + len(good)) // 2
    damaged = tree / "val" / "cat" / "1.jpg"   # passes the scan, fails a decode
    damaged.write_bytes(good[:mid] + b"\xff\x6e" + good[mid + 2:])
    _age(tree)

    done = _pipeline("index", str(tree))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["how"] == "listed" and (summary["train"], summary["val"]) == (13, 6)
    assert summary["corrupt_at_scan"] == 1 and summary["index"] == str(tree / INDEX_NAME)
    assert json.loads(_pipeline("index", str(tree)).stdout.splitlines()[-1])["how"] == "index"

    done = _pipeline("check", str(tree), "--workers", "2")
    assert done.returncode == 2
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["files"] == 19 and summary["corrupt"] == 2
    assert sorted(f["path"] for f in summary["corrupt_files"]) == \
        sorted(map(str, [tree / "train" / "bee" / "notes.jpg", damaged]))
