"""Start-up at ImageNet scale: time and peak memory until the loaders can serve a first batch.

Writes (once) an ImageNet-shaped tree of tiny JPEGs — ``--classes`` folders with
``--train-per-class`` / ``--val-per-class`` files each (1000 × 1281 / 50 = 1.33 M files by
default, ~5.5 GB on ext4) — then times, each in a fresh process (imports included) and with
its peak RSS:

  scan         ``build_loaders`` without an index: list the tree and check every file (what
               every start of every rank did before the index)
  index-build  the first start with ``index_dir``: the same work, plus writing the index
  index-reuse  every later start / resume: read the index, stat the folders
  first-batch  index-reuse plus the first training batch (DALI)

    .venv/bin/python -m benchmarks.startup --root /tmp/imagenet-tiny [--train-per-class 1281]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import emit

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from pipeline.config import DataConfig
from pipeline.data import build_loaders
import pipeline.data.dali_backend
imported = time.perf_counter()
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
root, index_dir, first = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1"
cfg = DataConfig(root=root, recipe="cifar", image_size=16, batch_size=64, workers=2)
train, val = build_loaders(cfg, rank=0, world_size=1, seed=0, index_dir=index_dir)
built = time.perf_counter()
if first:
    next(iter(train.epoch(0)))
print(json.dumps({"files": train.num_samples + val.num_samples,
                  "import_s": round(imported - start, 2), "loaders_s": round(built - imported, 2),
                  "first_batch_s": round(time.perf_counter() - built, 2) if first else None,
                  "import_rss_mb": round(import_rss / 1024)}))
"""


def tiny_jpegs(count: int = 16, size: int = 8) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def write_tree(root: Path, classes: int, per_split: dict[str, int]) -> int:
    """ROOT/{train,val}/nXXXXXXXX/nXXXXXXXX_<i>.JPEG; returns the number of files written."""
    contents = tiny_jpegs()
    written = 0
    for split, per_class in per_split.items():
        for c in range(classes):
            name = f"n{c:08d}"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{name}_{i}.JPEG").write_bytes(contents[(c + i) % len(contents)])
            written += per_class
    return written


def measure(root: Path, index_dir: str, first_batch: bool) -> dict:
    """Phases (imports, loaders, first batch), wall seconds and peak RSS of a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), index_dir,
                             "1" if first_batch else "0"], stdout=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    phases = json.loads(proc.stdout.read())
    proc.stdout.close()
    if status != 0:
        raise RuntimeError(f"start-up child failed with status {status}")
    return {**phases, "process_s": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "load_average_1min": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="tree to use; written if missing")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-per-class", type=int, default=1281)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--write-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.root)
    if not root.exists():
        start = time.perf_counter()
        files = write_tree(root, args.classes, {"train": args.train_per_class,
                                                "val": args.val_per_class})
        emit({"benchmark": "startup.write_tree", "files": files,
              "seconds": round(time.perf_counter() - start, 1)})
    if args.write_only:
        return
    with tempfile.TemporaryDirectory() as index_dir:
        emit({"benchmark": "startup.scan", **measure(root, "", False)})
        emit({"benchmark": "startup.index_build", **measure(root, index_dir, False)})
        emit({"benchmark": "startup.index_reuse", **measure(root, index_dir, False)})
        emit({"benchmark": "startup.first_batch", **measure(root, index_dir, True)})


if __name__ == "__main__":
    main()
