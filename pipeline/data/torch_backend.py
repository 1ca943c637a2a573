"""The torchvision path: an ImageFolder-equivalent Dataset over the scanned file list and a
DataLoader reading exactly the index list ``order.py`` gives (same order as the DALI path).

The DataLoader is built once per split with persistent workers; each pass only swaps the
sampler's key list (the sampler lives in the main process), so workers are not respawned. A
worker loads a whole batch (``__getitems__``): each file's bytes are checked as in the DALI path
(``layout.encoded_size``), decoded with PIL, then cropped and flipped by ``recipe.train_crops``
— drawn from (pass key, sample index), so the worker count, the batch a sample lands in and a
mid-epoch resume change nothing. Corrupt files follow ``on_corrupt`` exactly as in the DALI
path (``layout.stand_ins``); the files dropped come back to the main process with the batch.
"""
from __future__ import annotations

import gc
import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pipeline.data.layout import CorruptImage, DataError, DecodeSkips, read_encoded, stand_ins
from pipeline.data.recipe import Recipe, sample_draws, train_crops


def _val_transform(recipe: Recipe) -> T.Compose:
    crop = [T.Resize(recipe.resize_shorter)] if recipe.name == "imagenet" else []
    return T.Compose(crop + [T.CenterCrop(recipe.size)])


def _decoded(path: str) -> Image.Image | CorruptImage:
    try:
        data, _ = read_encoded(path)
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except CorruptImage as err:
        return err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, … for bad data
        first = str(err).splitlines()[0] if str(err) else ""
        return CorruptImage(f"{type(err).__name__}: {first}")


class ImageFiles(Dataset):
    """Batches of ``(images, labels, dropped files)`` for lists of ``(index, pass key)``."""

    def __init__(self, files: list[str], labels: list[int], recipe: Recipe, train: bool,
                 on_corrupt: str):
        self.files, self.labels, self.recipe, self.train = files, labels, recipe, train
        self.on_corrupt = on_corrupt
        self.val_view = _val_transform(recipe)
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])

    def __len__(self) -> int:
        return len(self.files)

    def _augment(self, images: list[Image.Image], key: int, indices: list[int]) -> list:
        crops = train_crops(self.recipe, sample_draws(key, indices), [im.size for im in images])
        out = []
        for k, image in enumerate(images):
            x, y, w, h = (int(v[k]) for v in (crops.x, crops.y, crops.w, crops.h))
            if self.recipe.name == "imagenet":
                image = F.resized_crop(image, y, x, h, w, [self.recipe.size] * 2, antialias=True)
            else:
                image = F.crop(image, y, x, h, w)   # zero-filled where outside the image
            out.append(F.hflip(image) if crops.flip[k] else image)
        return out

    def __getitems__(self, keys: list[tuple[int, int]]):
        indices = [i for i, _ in keys]
        paths = [self.files[i] for i in indices]
        loaded = [_decoded(p) for p in paths]
        errors = [str(x) if isinstance(x, CorruptImage) else None for x in loaded]
        shown = stand_ins(paths, errors, self.on_corrupt)
        images = [loaded[s] for s in shown]
        images = self._augment(images, keys[0][1], indices) if self.train \
            else [self.val_view(im) for im in images]
        return (torch.stack([self.normalise(im) for im in images]),
                torch.tensor([self.labels[indices[s]] for s in shown]),
                [(p, e) for p, e in zip(paths, errors) if e is not None])


def _whole(batch):
    return batch


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
                 batch_size: int, workers: int, device: torch.device, pin_memory: bool,
                 on_corrupt: str):
        self.device = device
        self.sampler = _IndexList()
        self.skips = DecodeSkips()
        self.loader = DataLoader(
            ImageFiles(files, labels, recipe, train, on_corrupt), batch_size=batch_size,
            sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=pin_memory, collate_fn=_whole)
        self.workers_started = workers == 0

    def batches(self, indices: np.ndarray, key: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) for the samples ``indices``, in order, on the source's device;
        ``key`` seeds the per-sample augmentation (``recipe.sample_draws``)."""
        self.sampler.indices = [(i, key) for i in indices.tolist()]
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
            for images, labels, dropped in self.loader:
                for path, reason in dropped:
                    self.skips.note(path, reason)
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))
        except DataError as err:
            # A worker's exception arrives wrapped in its traceback: keep the one-line message.
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ")[-1]) from None
