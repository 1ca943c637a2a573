"""DALI vs torchvision throughput of the paired segmentation loaders, same tree, same threads.

Writes a Cityscapes-layout tree of 2048×1024 frames (generated scenes rendered at 512×256,
upscaled bicubically, with sensor-like noise so that a PNG weighs and decodes like a real
Cityscapes frame: ~2–3 MB) and their label-id PNGs, builds both loaders through
``build_segmentation_loaders`` with the mmseg Cityscapes recipe (random scale 0.5–2.0 of the
frame, 512×1024 crop, flip; ``--photometric`` adds the distortion) and ``workers`` decoding
threads / DataLoader processes each, and times whole training epochs of each, interleaved,
after a warm-up epoch. On a shared machine wall-clock rates follow the load; the CPU time per
image (this process's threads plus the DataLoader workers) is the load-independent figure.
Both backends resize only the crop window (``augment.py``), so PNG decoding (zlib, on the CPU
in both: nvImageCodec has no GPU PNG decoder) dominates both; the ``pil_scale_crop`` line
shows what the torchvision reference's whole-frame resize would add.

    .venv/bin/python -m benchmarks.seg_loader [--images 24] [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import emit
from benchmarks.loader import time_backends
from pipeline.config import DataConfig
from pipeline.data.segmentation.scenes import render

FRAME = (2048, 1024)


def write_frames(root: Path, count: int, seed: int = 0) -> float:
    """``count`` train frames (and 2 val) in the Cityscapes layout; returns MB per frame."""
    sizes = []
    for split, n in (("train", count), ("val", 2)):
        for i in range(n):
            rng = np.random.default_rng([seed, i, split == "val"])
            image, label, _ = render(rng, FRAME[0] // 4, FRAME[1] // 4)
            big = np.asarray(Image.fromarray(image).resize(FRAME, Image.Resampling.BICUBIC))
            noisy = np.clip(big + rng.normal(0, 2.5, big.shape), 0, 255).astype(np.uint8)
            stem = f"bench_{i:06d}_000019"
            paths = (root / "leftImg8bit" / split / "bench" / f"{stem}_leftImg8bit.png",
                     root / "gtFine" / split / "bench" / f"{stem}_gtFine_labelIds.png")
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(paths[0])
            Image.fromarray(label).resize(FRAME, Image.Resampling.NEAREST).save(paths[1])
            sizes.append(paths[0].stat().st_size)
    return statistics.mean(sizes) / 1e6


def resize_ms(frame: Path, repeats: int = 4) -> dict[str, float]:
    """CPU ms of the two ways to scale-and-crop one decoded frame with PIL: the torchvision
    reference's (resize the whole frame by s, then crop) and ours (resize only the window)."""
    rng = np.random.default_rng(0)
    with Image.open(frame) as im:
        image = im.convert("RGB")
    spent = {"whole_frame_then_crop": 0.0, "window_only": 0.0}
    for _ in range(repeats):
        s = rng.uniform(1.0, 2.0)
        width, height = round(FRAME[0] * s), round(FRAME[1] * s)
        left, top = int(rng.integers(0, width - 1024)), int(rng.integers(0, height - 512))
        start = time.process_time()
        image.resize((width, height), Image.Resampling.BILINEAR).crop(
            (left, top, left + 1024, top + 512))
        spent["whole_frame_then_crop"] += time.process_time() - start
        start = time.process_time()
        image.transform((1024, 512), Image.Transform.AFFINE,
                        (1 / s, 0.0, left / s, 0.0, 1 / s, top / s), Image.Resampling.BILINEAR)
        spent["window_only"] += time.process_time() - start
    return {k: round(1e3 * v / repeats, 1) for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--photometric", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        megabytes = write_frames(root, args.images)
        emit({"benchmark": "seg_loader.pil_scale_crop", "frame": "2048x1024", "crop": "512x1024",
              "scale": "1-2", "cpu_ms": resize_ms(next(root.rglob("*_leftImg8bit.png")))})
        images, seconds, cpu = time_backends(
            lambda backend: DataConfig(root=str(root), layout="cityscapes", backend=backend,
                                       crop_size=[512, 1024], scale_range=[0.5, 2.0],
                                       photometric=args.photometric,
                                       batch_size=args.batch_size, workers=args.workers),
            args.repeats)
    rates = {name: images / s for name, s in seconds.items()}
    for name, rate in rates.items():
        emit({"benchmark": "seg_loader.epoch", "loader": name, "workers": args.workers,
              "images": images, "frame": "2048x1024", "crop": "512x1024",
              "photometric": args.photometric, "png_mb": round(megabytes, 2),
              "seconds": round(seconds[name], 3), "images_per_s": round(rate, 2),
              "cpu_ms_per_image": round(1e3 * statistics.median(cpu[name][1:]) / images, 1)})
    cpu_ratio = statistics.median(cpu["torchvision"][1:]) / statistics.median(cpu["dali"][1:])
    emit({"benchmark": "seg_loader.ratio", "workers": args.workers,
          "photometric": args.photometric,
          "dali_over_torchvision": round(rates["dali"] / rates["torchvision"], 2),
          "cpu_efficiency_dali_over_torchvision": round(cpu_ratio, 2),
          "load_average_1min": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
