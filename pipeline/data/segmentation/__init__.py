"""Segmentation data: Cityscapes / VOC pairs → sharded, augmented (image, train-id map) batches.

    train, val = build_segmentation_loaders(cfg.data, rank=r, world_size=w, seed=s, device=d)
    for step, (images, labels) in enumerate(train.epoch(epoch, start_step), start=start_step): …
    for images, labels in val: …          # whole images; val.image_files: this rank's, in order
    test = build_eval_loader(cfg.data, "test", rank=r, world_size=w, device=d)   # any split

``images``: float32 NCHW normalised with ``data.mean`` / ``data.std``; ``labels``: int64 NHW of
train ids, 255 = ignore; both on ``device``. Training batches are ``data.crop_size`` crops of
the joint augmentation in ``augment.py``; their order, sharding and mid-epoch resume are the
classification loader's (``order.py``: ``len(train)`` steps per epoch on every rank), and a
sample's random window depends on (seed, epoch, sample index) alone, so a resumed epoch yields
the very batches of an uninterrupted one. Validation reads every image exactly once over all
ranks (rank r: images r, r+W, …) at full resolution; images of different sizes (VOC) in one
batch are padded to the largest — image 0 before normalisation, label 255, so the padding
never counts — and ``val.image_files`` gives each image's file, to crop a prediction back to
its size (``predictions.py``); ``data.val_batch_size=1`` avoids the padding altogether (the
padded border can still change predictions near the edge through the receptive field).
``data.backend``: ``dali`` (``dali_pairs.py``) or ``torchvision`` (``torch_pairs.py``), the same
windows and pixel semantics. Layouts and their checks: ``layouts.py``. ``skipped`` lists the
files of pairs dropped at scan time, ``skipped_at_decode`` names the label files whose values fell
outside the table and were ignored while reading (both with ``data.on_corrupt=skip``).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.data import TrainLoader, checked_sizes
from pipeline.data.order import val_indices
from pipeline.data.segmentation.augment import PairRecipe, recipe_from_config, sample_draws
from pipeline.data.segmentation.layouts import PairSplit, SegLayout, scan_segmentation, scan_split

__all__ = ["SegTrainLoader", "SegValLoader", "build_segmentation_loaders", "build_eval_loader"]


class SegTrainLoader(TrainLoader):
    """One rank's training crops; ``epoch(e, start_step)`` as the classification TrainLoader."""

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.indices(epoch, start_step)
        return self.source.batches(indices, sample_draws(self.seed, epoch, indices))


class SegValLoader:
    """One rank's whole-image validation shard; over all ranks every image exactly once."""

    def __init__(self, source, split: PairSplit, *, batch_size: int, rank: int, world_size: int):
        self.source, self.split, self.batch_size = source, split, batch_size
        self.num_samples = len(split)
        self.skipped = split.skipped
        self.shard = val_indices(len(split), rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.batches(self.shard)

    @property
    def skipped_at_decode(self) -> set[str]:
        """The label files this rank has ignored while reading (on_corrupt=skip)."""
        return set(self.source.skips)

    @property
    def image_files(self) -> list[str]:
        """This rank's image files in the order its batches hold them."""
        return [self.split.images[i] for i in self.shard]


def _source(cfg_data, split: PairSplit, recipe: PairRecipe, *, train: bool, batch_size: int,
            device: torch.device):
    common = dict(train=train, batch_size=batch_size, device=device,
                  on_corrupt=cfg_data.on_corrupt)
    if cfg_data.backend == "dali":
        from pipeline.data.segmentation.dali_pairs import PairDaliSource
        return PairDaliSource(split, recipe, threads=int(cfg_data.workers),
                              prefetch=int(cfg_data.prefetch), **common)
    from pipeline.data.segmentation.torch_pairs import PairTorchSource
    pin = cfg_data.pin_memory if cfg_data.pin_memory is not None else device.type == "cuda"
    return PairTorchSource(split, recipe, workers=int(cfg_data.workers), pin_memory=bool(pin),
                           **common)


def build_segmentation_loaders(cfg_data, *, rank: int, world_size: int, seed: int,
                               device: torch.device | str = "cpu"
                               ) -> tuple[SegTrainLoader, SegValLoader]:
    """Scan ``data.root`` (``data.layout`` cityscapes | voc) and return this rank's loaders."""
    batch_size, val_batch_size = checked_sizes(cfg_data, rank, world_size)
    device = torch.device(device)
    recipe = recipe_from_config(cfg_data)
    layout: SegLayout = scan_segmentation(cfg_data)
    train = SegTrainLoader(
        _source(cfg_data, layout.train, recipe, train=True, batch_size=batch_size, device=device),
        layout, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    val = SegValLoader(
        _source(cfg_data, layout.val, recipe, train=False, batch_size=val_batch_size,
                device=device),
        layout.val, batch_size=val_batch_size, rank=rank, world_size=world_size)
    return train, val


def build_eval_loader(cfg_data, split: str, *, rank: int, world_size: int,
                      device: torch.device | str = "cpu") -> SegValLoader:
    """Whole-image batches of any split (Cityscapes train / val / test, a VOC list name), e.g.
    to write predictions. The split needs its label files: Cityscapes' test labels exist but
    hold only the calibration classes (ego vehicle, ROI), all ignored in evaluation."""
    _, val_batch_size = checked_sizes(cfg_data, rank, world_size)
    device = torch.device(device)
    pairs = scan_split(cfg_data, split)
    source = _source(cfg_data, pairs, recipe_from_config(cfg_data), train=False,
                     batch_size=val_batch_size, device=device)
    return SegValLoader(source, pairs, batch_size=val_batch_size, rank=rank,
                        world_size=world_size)
