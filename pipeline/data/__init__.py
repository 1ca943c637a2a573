"""Data: ImageNet-layout folders → sharded, per-epoch reshuffled batches (DALI or torchvision).

    train, val = build_loaders(cfg.data, rank=r, world_size=w, seed=s, device=d,
                               index_dir=run_dir)
    for step, (images, labels) in enumerate(train.epoch(epoch, start_step), start=start_step): …
    for images, labels in val: …

``images``: float32 NCHW, normalised; ``labels``: int64 N; both on ``device``.
``len(train)`` is the number of steps per epoch, the same on every rank. Sample order and
sharding (``order.py``) are identical for both backends, and so is the augmentation of a sample
(``recipe.py``: a function of seed, epoch and sample index), so ``train.epoch(e, k)`` yields
exactly the batches ``k…`` of ``train.epoch(e)``. The tree is listed through the scan index
(``index.py``) kept in ``index_dir``. Problems with the files on disk raise ``DataError`` (a
ValueError) with a one-line message; corrupt files follow ``data.on_corrupt``: ``skipped`` lists
those dropped at scan time, ``skipped_at_decode`` names those dropped while reading.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.data.index import scan, scan_val
from pipeline.data.layout import DataError, Layout, Split
from pipeline.data.order import stream_seed, steps_per_epoch, train_indices, val_indices
from pipeline.data.recipe import recipe_from_config

__all__ = ["DataError", "TrainLoader", "ValLoader", "build_loaders", "build_val_loader"]

BACKENDS = ("dali", "torchvision")


class TrainLoader:
    """One rank's training batches; ``epoch(e, start_step)`` iterates one epoch of it."""

    def __init__(self, source, layout: Layout, *, batch_size: int, rank: int, world_size: int,
                 seed: int):
        self.source, self.batch_size = source, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.classes = layout.classes
        self.num_classes = len(layout.classes)
        self.num_samples = len(layout.train)
        self.skipped = layout.train.skipped
        self.steps = steps_per_epoch(self.num_samples, batch_size, world_size)
        if self.steps == 0:
            raise DataError(f"{self.num_samples} training images in {layout.root} are fewer than "
                            f"one global batch ({world_size} ranks × data.batch_size={batch_size})")

    def __len__(self) -> int:
        return self.steps

    def indices(self, epoch: int, start_step: int = 0):
        """Indices into the train file list this rank reads in ``epoch`` from ``start_step``."""
        return train_indices(self.num_samples, self.batch_size, rank=self.rank,
                             world_size=self.world_size, seed=self.seed, epoch=epoch,
                             start_step=start_step)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.batches(self.indices(epoch, start_step), stream_seed(self.seed, epoch))

    @property
    def skipped_at_decode(self) -> set[str]:
        """The corrupt files this rank has dropped while reading (on_corrupt=skip)."""
        return set(self.source.skips)


class ValLoader:
    """One rank's validation shard; over all ranks every image is read exactly once."""

    def __init__(self, source, split: Split, classes: list[str], *, batch_size: int, rank: int,
                 world_size: int):
        self.source, self.classes = source, classes
        self.num_samples = len(split)
        self.skipped = split.skipped
        self.shard = val_indices(self.num_samples, rank=rank, world_size=world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.batches(self.shard, 0)   # no randomness in validation

    @property
    def skipped_at_decode(self) -> set[str]:
        """The corrupt files this rank has dropped while reading (on_corrupt=skip)."""
        return set(self.source.skips)


def _source(cfg_data, split, recipe, *, train: bool, batch_size: int, device: torch.device):
    workers, on_corrupt = int(cfg_data.workers), cfg_data.on_corrupt
    if cfg_data.backend == "dali":
        from pipeline.data.dali_backend import DaliSource
        return DaliSource(split.files, split.labels, recipe, train=train, batch_size=batch_size,
                          threads=workers, prefetch=int(cfg_data.prefetch), device=device,
                          on_corrupt=on_corrupt)
    from pipeline.data.torch_backend import TorchSource
    pin = cfg_data.pin_memory if cfg_data.pin_memory is not None else device.type == "cuda"
    return TorchSource(split.files, split.labels, recipe, train=train, batch_size=batch_size,
                       workers=workers, device=device, pin_memory=bool(pin),
                       on_corrupt=on_corrupt)


def build_loaders(cfg_data, *, rank: int, world_size: int, seed: int,
                  device: torch.device | str = "cpu",
                  index_dir: str | Path | None = None) -> tuple[TrainLoader, ValLoader]:
    """Scan ``cfg_data.root`` and return this rank's (train, val) loaders.

    ``cfg_data`` is the ``data`` section of the config (DataConfig fields). A CUDA ``device``
    selects the GPU path (DALI ``mixed`` decoding on that device; pinned torchvision batches
    unless ``data.pin_memory=false``). ``index_dir`` (the run directory) keeps the scan index
    shared by all ranks and restarts (``index.py``); None lists the tree on every call unless
    ROOT holds a fresh index from ``pipeline data index ROOT``.
    ``data.layout`` ``cityscapes`` / ``voc`` give segmentation loaders of the same interface
    (``pipeline.data.segmentation``), whose targets are ``[N, H, W]`` train-id maps.
    """
    if getattr(cfg_data, "layout", "imagenet") != "imagenet":
        from pipeline.data.segmentation import build_segmentation_loaders
        return build_segmentation_loaders(cfg_data, rank=rank, world_size=world_size, seed=seed,
                                          device=device)
    batch_size, val_batch_size = checked_sizes(cfg_data, rank, world_size)
    device = torch.device(device)
    recipe = recipe_from_config(cfg_data)
    layout = scan(cfg_data.root, on_corrupt=cfg_data.on_corrupt, index_dir=index_dir)
    train = TrainLoader(
        _source(cfg_data, layout.train, recipe, train=True, batch_size=batch_size, device=device),
        layout, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    val = ValLoader(
        _source(cfg_data, layout.val, recipe, train=False, batch_size=val_batch_size,
                device=device),
        layout.val, layout.classes, batch_size=val_batch_size, rank=rank, world_size=world_size)
    return train, val


def build_val_loader(cfg_data, *, rank: int, world_size: int, device: torch.device | str = "cpu",
                     index_dir: str | Path | None = None):
    """This rank's validation loader alone, to evaluate saved weights: only the val split is
    listed (or read from a fresh index); its class folders are the ``classes``. Segmentation
    layouts give ``pipeline.data.segmentation.build_eval_loader(cfg_data, "val", …)``."""
    if getattr(cfg_data, "layout", "imagenet") != "imagenet":
        from pipeline.data.segmentation import build_eval_loader
        return build_eval_loader(cfg_data, "val", rank=rank, world_size=world_size,
                                 device=device)
    _, val_batch_size = checked_sizes(cfg_data, rank, world_size)
    device = torch.device(device)
    classes, split = scan_val(cfg_data.root, on_corrupt=cfg_data.on_corrupt, index_dir=index_dir)
    return ValLoader(_source(cfg_data, split, recipe_from_config(cfg_data), train=False,
                             batch_size=val_batch_size, device=device),
                     split, classes, batch_size=val_batch_size, rank=rank, world_size=world_size)


def checked_sizes(cfg_data, rank: int, world_size: int) -> tuple[int, int]:
    """(train, val) batch sizes per rank, after checking the backend, rank and sizes."""
    if cfg_data.backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {list(BACKENDS)}, got {cfg_data.backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    batch_size = int(cfg_data.batch_size)
    val_batch_size = int(cfg_data.val_batch_size) or batch_size
    if batch_size <= 0 or val_batch_size <= 0:
        raise ValueError("data.batch_size must be > 0 and data.val_batch_size >= 0")
    return batch_size, val_batch_size
