"""DALI vs torchvision loader throughput on the same JPEG folder, same thread budget.

Writes ~500×375 JPEGs of smooth random content (ImageNet-sized, ~40–60 KB) into a temp
ImageNet-layout tree, builds both loaders through ``build_loaders`` (imagenet recipe at 224,
``workers`` threads / worker processes each), and times whole training epochs of each,
interleaved, after a warm-up epoch (each timed epoch a new epoch number). Also times the
listing of the tree with the scan-time corrupt check (what the scan index saves at a start).
On a shared machine wall-clock rates follow the load; the CPU time per image (this process's
threads plus the DataLoader worker processes) is the load-independent efficiency figure.

    .venv/bin/python benchmarks/loader.py [--images 512] [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks.common import emit, median_seconds
from pipeline.config import DataConfig
from pipeline.data import build_loaders
from pipeline.data.index import list_tree

CLASSES = 4


def write_jpegs(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", 2 * CLASSES)):
        for i in range(n):
            folder = root / split / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
            image = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """User + system time of this process (DALI threads) and its children (DataLoader workers)."""
    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me] + me.children(recursive=True))


def epoch_runner(loader, cpu: list[float]):
    """A closure running the next epoch; appends the CPU seconds it used to ``cpu``
    (the first entry, the warm-up, includes starting DataLoader workers)."""
    epochs = itertools.count()

    def run() -> int:
        start = cpu_seconds()
        count = sum(len(labels) for _, labels in loader.epoch(next(epochs)))
        cpu.append(cpu_seconds() - start)
        return count

    return run



def time_backends(config_for, repeats: int) -> tuple[int, dict[str, float], dict[str, list]]:
    """Epochs of the train loader of ``config_for(backend)`` for DALI and torchvision,
    interleaved: (images per epoch, median seconds per backend, CPU seconds per epoch per
    backend)."""
    runners, cpu = {}, {}
    for backend in ("dali", "torchvision"):
        cfg = config_for(backend)
        train, _ = build_loaders(cfg, rank=0, world_size=1, seed=0, device="cpu")
        cpu[backend] = []
        runners[backend] = epoch_runner(train, cpu[backend])
        images = len(train) * cfg.batch_size
    return images, median_seconds(runners, repeats=repeats, warmup=1), cpu

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.images)
        start = time.perf_counter()
        list_tree(str(root))
        scan_us = (time.perf_counter() - start) / (args.images + 2 * CLASSES) * 1e6
        emit({"benchmark": "loader.scan", "files": args.images + 2 * CLASSES,
              "us_per_file": round(scan_us, 1)})
        images, seconds, cpu = time_backends(
            lambda backend: DataConfig(root=str(root), backend=backend, recipe="imagenet",
                                       image_size=224, batch_size=args.batch_size,
                                       workers=args.workers), args.repeats)
    rates = {name: images / s for name, s in seconds.items()}
    for name, rate in rates.items():
        emit({"benchmark": "loader.epoch", "loader": name, "workers": args.workers,
              "images": images, "image_size": 224, "seconds": round(seconds[name], 3),
              "images_per_s": round(rate, 1),
              "cpu_ms_per_image": round(1e3 * statistics.median(cpu[name][1:]) / images, 2)})
    cpu_ratio = statistics.median(cpu["torchvision"][1:]) / statistics.median(cpu["dali"][1:])
    emit({"benchmark": "loader.ratio", "workers": args.workers,
          "dali_over_torchvision": round(rates["dali"] / rates["torchvision"], 2),
          "cpu_efficiency_dali_over_torchvision": round(cpu_ratio, 2),
          "load_average_1min": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
