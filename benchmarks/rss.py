"""Host memory over many short epochs: RSS after every epoch, per backend.

The DALI path builds a new pipeline for every pass (each train epoch, each validation sweep);
the torchvision path keeps persistent workers. Anything either leaks per pass shows as RSS
growing with the epoch count. Each backend runs in a fresh process over the same temporary
ImageNet-layout tree (``--images`` JPEGs of 160×120, imagenet recipe at 64); one JSON line per
epoch (RSS of the process, and of the DataLoader workers), then one summary per backend: RSS
after the first epoch, the last, and the growth per epoch fitted over the second half.

    .venv/bin/python -m benchmarks.rss [--epochs 100] [--images 256] [--workers 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import emit


def write_tree(root: Path, images: int, classes: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", images // 4)):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(coarse).resize((160, 120), Image.Resampling.BICUBIC).save(
                folder / f"{i:05d}.jpg", quality=90)


def rss_mb() -> tuple[float, float]:
    """RSS of this process and of its child processes (DataLoader workers), in MB."""
    me = psutil.Process()
    children = sum(c.memory_info().rss for c in me.children(recursive=True))
    return me.memory_info().rss / 2**20, children / 2**20


def run_backend(root: str, backend: str, epochs: int, workers: int, batch_size: int) -> None:
    from pipeline.config import DataConfig
    from pipeline.data import build_loaders

    cfg = DataConfig(root=root, backend=backend, recipe="imagenet", image_size=64,
                     batch_size=batch_size, workers=workers)
    train, val = build_loaders(cfg, rank=0, world_size=1, seed=0)
    rows = []
    for epoch in range(epochs):
        for _ in train.epoch(epoch):
            pass
        for _ in val:
            pass
        main, children = rss_mb()
        rows.append(main + children)
        emit({"benchmark": "rss.epoch", "backend": backend, "epoch": epoch + 1,
              "rss_mb": round(main, 1), "workers_rss_mb": round(children, 1)})
    half = np.arange(epochs // 2, epochs)
    slope = np.polyfit(half + 1, np.array(rows)[half], 1)[0] if len(half) > 1 else 0.0
    emit({"benchmark": "rss.summary", "backend": backend, "epochs": epochs,
          "first_epoch_mb": round(rows[0], 1), "last_epoch_mb": round(rows[-1], 1),
          "growth_mb_per_epoch_second_half": round(float(slope), 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", help=argparse.SUPPRESS)   # one backend, in this process
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        run_backend(args.root, args.backend, args.epochs, args.workers, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_tree(Path(tmp), args.images)
        for backend in ("dali", "torchvision"):
            subprocess.run([sys.executable, "-m", "benchmarks.rss", "--backend", backend,
                            "--root", tmp, "--epochs", str(args.epochs),
                            "--workers", str(args.workers), "--batch-size", str(args.batch_size)],
                           check=True)


if __name__ == "__main__":
    main()
