"""Segmentation predictions in Cityscapes' official format (``pipeline predict``).

Every image of a split (val, test, or train), at full resolution, through the run's evaluation
forward (``segmentation.val_mode``: whole image or sliding window), written as a single-channel
PNG of Cityscapes label ids named ``<city>_<seq>_<frame>_pred_labelIds.png``: what
``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` and the benchmark server read.
Under torchrun each rank writes its shard (every image exactly once); no process group is
needed, since nothing is reduced.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.config import ConfigError
from pipeline.data.segmentation import build_eval_loader
from pipeline.data.segmentation.labels import cityscapes_classes
from pipeline.data.segmentation.predictions import write_cityscapes_prediction
from pipeline.tasks import build_task

from .distributed import place
from .evaluate import AUTOCAST, memory_format


@torch.no_grad()
def predict(model: torch.nn.Module, cfg: DictConfig, split: str, out: Path) -> int:
    """Write the predictions of ``model`` (eval mode) for this rank's share of ``split`` into
    ``out``; returns how many it wrote."""
    if cfg.task != "segmentation" or cfg.data.layout != "cityscapes":
        raise ConfigError("pipeline predict writes Cityscapes predictions: the checkpoint's "
                          f"config has task={cfg.task}, data.layout={cfg.data.layout}")
    where = place()
    loader = build_eval_loader(cfg.data, split, rank=where.rank, world_size=where.world_size,
                               device=where.device)
    task = build_task(cfg, list(cityscapes_classes()))
    fmt = memory_format(cfg, where.device)
    model.to(where.device, memory_format=fmt).eval()
    dtype = AUTOCAST[cfg.engine.precision]
    files = iter(loader.image_files)
    written = 0
    for images, _ in loader:
        with torch.autocast(where.device.type, dtype=dtype, enabled=dtype is not None):
            logits = task.infer(model, images.contiguous(memory_format=fmt))
        for train_ids in logits.argmax(1).cpu():
            write_cityscapes_prediction(train_ids, next(files), out)
            written += 1
    return written
