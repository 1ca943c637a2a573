"""The torchvision path for pairs: PIL decoding and the same geometry as the DALI pipeline.

A sample's crop window (``augment.py``) is applied with one PIL affine transform per file —
bilinear for the image (no antialiasing: DALI's resize without it, to ±1 grey level),
nearest for the label (the same pixels as DALI's nearest) — then the photometric steps
(tensor ops equal to DALI's brightness_contrast / hsv up to rounding), the pad to the crop
(image 0, label 255) and the flip. Labels are
read as class values (mode L, or the indices of a palette PNG) and mapped to train ids. Batches
travel as uint8 and are normalised on ``device``. Validation images of different sizes are
padded to the batch's largest (image 0, label 255), as in the DALI path.

The sampler hands each worker ``(index, draws)`` pairs, so augmentation does not depend on
worker seeding: a sample gets the same window in both backends and after a resume.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data.layout import DataError
from pipeline.data.segmentation.augment import (Geometry, PairRecipe, Photometric,
                                                crop_geometry, photometric_params)
from pipeline.data.segmentation.labels import IGNORE, drop_illegal
from pipeline.data.segmentation.layouts import PairSplit
from pipeline.data.torch_backend import _IndexList


def _load(path: str, mode: str | None) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert(mode) if mode else im.copy()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, … for bad data
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"cannot decode image: {path} ({type(err).__name__}: {first}); "
                        "remove or replace the file") from None


# NTSC YIQ: hue and saturation turn and scale the chroma (I, Q) and keep the luma, as DALI's
# hsv operator does, so both backends distort colours the same way.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321],
                        [0.211, -0.523, 0.311]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _chroma_matrix(saturation: float, hue_degrees: float) -> torch.Tensor:
    angle = np.deg2rad(hue_degrees)
    turn = np.array([[1, 0, 0], [0, np.cos(angle), np.sin(angle)],
                     [0, -np.sin(angle), np.cos(angle)]])
    scale = np.diag([1.0, saturation, saturation])
    return torch.from_numpy(_YIQ_TO_RGB @ turn @ scale @ _RGB_TO_YIQ).float()


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.round_().clamp_(0, 255).to(torch.uint8)


def distort(image: torch.Tensor, p: Photometric, i: int) -> torch.Tensor:
    """Sample ``i``'s photometric distortion of a uint8 CHW image (``augment.py``); every step
    rounds and saturates to 0…255, as DALI's uint8 operators do."""
    if p.brightness[i] or p.contrast_first[i] != 1:
        contrast = float(p.contrast_first[i])
        image = _to_uint8(image.float().mul_(contrast).add_(float(p.brightness[i]) * contrast))
    if p.saturation[i] != 1 or p.hue[i]:
        matrix = _chroma_matrix(float(p.saturation[i]), float(p.hue[i]))
        image = _to_uint8(torch.einsum("ij,jhw->ihw", matrix, image.float()))
    if p.contrast_last[i] != 1:
        image = _to_uint8(image.float().mul_(float(p.contrast_last[i])))
    return image


class PairFiles(Dataset):
    """(uint8 CHW image, uint8 train-id map, illegal-values flag) of pair ``i``; in training
    the item is ``(i, draws)`` and the pair comes out augmented to the crop size."""

    def __init__(self, split: PairSplit, recipe: PairRecipe, train: bool):
        self.split, self.recipe, self.train = split, recipe, train

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item):
        i, draws = item if self.train else (item, None)
        image = _load(self.split.images[i], "RGB")
        label = _load(self.split.labels[i], None)
        illegal = bool(self.split.table.illegal_values(np.asarray(label)))
        if draws is None:
            return self._tensors(image, label) + (illegal,)
        draws = np.asarray(draws, np.float64)[None]
        g = crop_geometry(np.array([[image.height, image.width]]), draws, self.recipe)
        x, y = self._tensors(*self._window(image, label, g))
        if self.recipe.photometric:
            x = distort(x, photometric_params(draws), 0)
        crop_h, crop_w = self.recipe.crop
        pad = (0, crop_w - x.shape[2], 0, crop_h - x.shape[1])
        x, y = F.pad(x, pad, value=0), F.pad(y, pad, value=IGNORE)
        if g.flip[0]:
            x, y = x.flip(-1), y.flip(-1)
        return x, y, illegal

    def _tensors(self, image: Image.Image, label: Image.Image):
        return (torch.from_numpy(np.array(image)).permute(2, 0, 1),
                torch.from_numpy(self.split.table.lut[np.asarray(label)]))

    @staticmethod
    def _window(image: Image.Image, label: Image.Image, g: Geometry):
        (height, width), (top, left), (bottom, right) = g.out[0], g.roi_start[0], g.roi_end[0]
        top, left, bottom, right = map(float, (top, left, bottom, right))
        affine = ((right - left) / width, 0.0, left, 0.0, (bottom - top) / height, top)
        size = (int(width), int(height))
        return (image.transform(size, Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR),
                label.transform(size, Image.Transform.AFFINE, affine, Image.Resampling.NEAREST))


def collate_padded(batch):
    """Stack (image, label, flag) samples, padding to the largest (image 0, label 255)."""
    images, labels, flags = zip(*batch)
    height = max(x.shape[1] for x in images)
    width = max(x.shape[2] for x in images)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value)

    return (torch.stack([padded(x, 0) for x in images]),
            torch.stack([padded(y, IGNORE) for y in labels]), torch.tensor(flags))


class PairTorchSource:
    """Batches of one split's pairs through a DataLoader over ``PairFiles``."""

    def __init__(self, split: PairSplit, recipe: PairRecipe, *, train: bool, batch_size: int,
                 workers: int, device: torch.device, on_corrupt: str, pin_memory: bool):
        self.split, self.train, self.batch_size = split, train, batch_size
        self.device, self.on_corrupt = device, on_corrupt
        self.skips: set[str] = set()     # label files ignored while reading (on_corrupt=skip)
        self.sampler = _IndexList()
        self.loader = DataLoader(PairFiles(split, recipe, train), batch_size=batch_size,
                                 sampler=self.sampler, num_workers=workers,
                                 persistent_workers=workers > 0, collate_fn=collate_padded,
                                 pin_memory=pin_memory)
        self.mean = torch.tensor([255 * m for m in recipe.mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in recipe.std], device=device).view(1, 3, 1, 1)
        self.workers_started = workers == 0

    def batches(self, indices: np.ndarray, draws: np.ndarray | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of the pairs ``indices``, in order (see ``PairDaliSource``)."""
        order = indices.tolist()
        self.sampler.indices = list(zip(order, map(tuple, draws.tolist()))) if self.train \
            else order
        if not order:
            return
        if not self.workers_started:
            # As in the classification TorchSource: free garbage owning native threads (a DALI
            # pipeline in a traceback cycle) before the workers fork, or a worker can hang.
            gc.collect()
            self.workers_started = True
        try:
            for step, (images, labels, flags) in enumerate(self.loader):
                images = images.to(self.device, non_blocking=True).float()
                labels = labels.to(self.device, non_blocking=True).long()
                if flags.any():
                    files = [self.split.labels[i] for i in
                             order[step * self.batch_size:step * self.batch_size + len(flags)]]
                    labels = drop_illegal(labels, flags.numpy(), files, self.split.table,
                                          self.on_corrupt, self.skips)
                yield images.sub_(self.mean).div_(self.std), labels
        except DataError as err:
            # A worker's exception arrives wrapped in its traceback: keep the one-line message.
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ")[-1]) from None
