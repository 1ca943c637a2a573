"""The torchvision path: an ImageFolder-equivalent Dataset over the scanned file list and a
DataLoader reading exactly the index list ``order.py`` gives (same order as the DALI path).

The DataLoader is built once per split with persistent workers; each pass only swaps the
sampler's index list (the sampler lives in the main process), so workers are not respawned.
Augmentation randomness: workers are seeded from the pass seed when they start; with
``workers=0`` the transforms draw from the process's global torch RNG, as torchvision's do.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from pipeline.data.layout import DataError
from pipeline.data.recipe import Recipe


def recipe_transform(recipe: Recipe, train: bool) -> T.Compose:
    if recipe.name == "imagenet" and train:
        crop = [T.RandomResizedCrop(recipe.size, scale=recipe.scale, ratio=recipe.ratio),
                T.RandomHorizontalFlip()]
    elif recipe.name == "imagenet":
        crop = [T.Resize(recipe.resize_shorter), T.CenterCrop(recipe.size)]
    elif train:
        crop = [T.RandomCrop(recipe.size, padding=recipe.pad, pad_if_needed=True),
                T.RandomHorizontalFlip()]
    else:
        crop = [T.CenterCrop(recipe.size)]
    return T.Compose(crop + [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])


class ImageFiles(Dataset):
    """(transformed RGB image, label) of ``files[i]``, decoded with PIL as ImageFolder does."""

    def __init__(self, files: list[str], labels: list[int], transform: T.Compose):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, … for bad data
            raise DataError(f"cannot decode image: {path} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); "
                            f"remove or replace the file") from None
        return self.transform(image), self.labels[i]


class _IndexList(Sampler[int]):
    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TorchSource:
    """Batches of one split's files through a DataLoader with the recipe's transforms."""

    def __init__(self, files: list[str], labels: list[int], recipe: Recipe, *, train: bool,
                 batch_size: int, workers: int, device: torch.device):
        self.device = device
        self.sampler = _IndexList()
        self.generator = torch.Generator()
        self.loader = DataLoader(
            ImageFiles(files, labels, recipe_transform(recipe, train)), batch_size=batch_size,
            sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda", generator=self.generator)
        self.workers_started = workers == 0

    def batches(self, indices: np.ndarray, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.indices = indices.tolist()
        self.generator.manual_seed(seed)
        if not self.sampler.indices:
            return
        if not self.workers_started:
            # The workers fork on the first pass. Garbage that owns native threads (a DALI
            # pipeline that raised, still held in a traceback cycle) must be freed here first:
            # collected in a forked worker, its destructor waits for threads the fork did not
            # copy, and the worker hangs.
            gc.collect()
            self.workers_started = True
        try:
            for images, labels in self.loader:
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))
        except DataError as err:
            # A worker's exception arrives wrapped in its traceback: keep the one-line message.
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ")[-1]) from None
