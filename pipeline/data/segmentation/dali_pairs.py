"""The paired DALI pipeline: image + label through one shared geometry, fed an explicit list.

Per pass (a train epoch, one validation sweep) a fresh pipeline reads the rank's ordered pair
list, as the classification ``DaliSource`` does (runs scheduled by hand, only for the list's
batches). Two inputs advance in lock-step over the same order:
  * images: ``readers.file`` over the image list;
  * labels: an ``external_source`` reading the label files in the same order (one batch per
    run, the last batch padded like the reader's), together with each sample's crop window,
    flip and photometric parameters (``augment.py``, drawn on the host from the epoch's
    draws). Palette PNGs (VOC) are re-typed as greyscale on the way (``palette_as_grey``), since
    DALI's decoder would expand their palettes to colours.
The image is decoded (``mixed`` on a CUDA device, else CPU), its crop window resized bilinearly
(no antialiasing, as mmsegmentation's cv2 resize), photometric distortion applied if enabled,
then padded to the crop (0), flipped and normalised in one ``crop_mirror_normalize``. The label
is decoded as greyscale on the CPU (checked for values outside the table there, see below),
moved to the GPU when there is one, resized nearest-neighbour with the same window, padded
(255), flipped, and mapped to train ids with ``lookup_table``. Validation: whole images,
padded to the batch's largest (image 0, label 255) only if the split's sizes differ.

Every label is checked for values outside the table on the CPU (a lookup + max per sample,
outside the training step's device work); a flagged sample raises a ``DataError`` naming the
file, or with ``on_corrupt="skip"`` has its whole label set to 255 and its file added to the
source's ``skips``.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

from pipeline.data.dali_backend import _one_line_cause
from pipeline.data.layout import DataError, decodes
from pipeline.data.segmentation.augment import PairRecipe, crop_geometry, photometric_params
from pipeline.data.segmentation.labels import (IGNORE, PALETTE, LabelTable, drop_illegal,
                                               palette_as_grey)
from pipeline.data.segmentation.layouts import PairSplit

_PREFETCH = 2
_COLOUR_TYPE_OFFSET = 25   # of the IHDR colour-type byte in a PNG file


def read_label_png(path: str) -> np.ndarray:
    """The encoded label file as DALI decodes it to class values (palette PNGs re-typed)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) > _COLOUR_TYPE_OFFSET and data[_COLOUR_TYPE_OFFSET] == PALETTE:
        data = palette_as_grey(data)
    return np.frombuffer(data, np.uint8)


def _feed(labels: list[str], sizes: np.ndarray, draws: np.ndarray | None, recipe: PairRecipe,
          batch_size: int) -> Iterator[tuple]:
    """Per batch: the encoded labels (and in training the crop windows, flips and photometric
    parameters) of the list, the last batch padded with its last sample as the reader pads."""
    for start in range(0, len(labels), batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), len(labels) - 1)
        encoded = [read_label_png(labels[i]) for i in rows]
        if draws is None:
            yield (encoded,)
            continue
        geometry = crop_geometry(sizes[rows], draws[rows], recipe)
        outputs = [encoded, list(geometry.out.astype(np.float32)), list(geometry.roi_start),
                   list(geometry.roi_end), list(geometry.flip.astype(np.int32))]
        if recipe.photometric:
            p = photometric_params(draws[rows])
            # (x + δ)·α as one affine step: shift δ·α, in units of the uint8 range
            outputs += [list(p.brightness * p.contrast_first / 255.0), list(p.contrast_first),
                        list(p.saturation), list(p.hue), list(p.contrast_last)]
        yield tuple(outputs)


def _photometric(images, brightness, contrast_first, saturation, hue, contrast_last):
    # uint8 in and out: every step saturates to 0…255, as mmseg's clip after each step
    images = fn.brightness_contrast(images, brightness_shift=brightness,
                                    contrast=contrast_first, contrast_center=0.0)
    images = fn.hsv(images, hue=hue, saturation=saturation)
    return fn.brightness_contrast(images, contrast=contrast_last, contrast_center=0.0)


@pipeline_def
def pair_pipeline(images: list[str], feed, table: LabelTable, recipe: PairRecipe, train: bool,
                  ragged: bool, gpu: bool):
    encoded, _ = fn.readers.file(files=images, random_shuffle=False, pad_last_batch=not train)
    outputs = 5 + 5 * recipe.photometric if train else 1
    fed = fn.external_source(source=feed, num_outputs=outputs, batch=True)
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                               adjust_orientation=False)
    labels = fn.decoders.image(fed[0], device="cpu", output_type=types.GRAY)
    illegal = np.flatnonzero(~table.legal).tolist()
    flags = fn.reductions.max(fn.lookup_table(labels, keys=illegal, values=[1] * len(illegal),
                                              default_value=0, dtype=types.UINT8))
    if gpu:
        labels = labels.gpu()
    window_args = {}
    if train:
        out, roi_start, roi_end, mirror = fed[1:5]
        window = dict(size=out, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                      antialias=False)
        images = fn.resize(images, interp_type=types.INTERP_LINEAR, **window)
        labels = fn.resize(labels, interp_type=types.INTERP_NN, **window)
        if recipe.photometric:
            images = _photometric(images, *fed[5:])
        # crop at anchor 0: pads at the bottom / right only, then mirrors the whole crop
        window_args = dict(crop=recipe.crop, crop_pos_x=0.0, crop_pos_y=0.0, mirror=mirror)
        labels = fn.flip(fn.crop(labels, crop=recipe.crop, crop_pos_x=0.0, crop_pos_y=0.0,
                                 out_of_bounds_policy="pad", fill_values=IGNORE),
                         horizontal=mirror)
    elif ragged:
        images = fn.pad(images, fill_value=0, axis_names="HW")
        labels = fn.pad(labels, fill_value=IGNORE, axis_names="HW")
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", out_of_bounds_policy="pad",
        fill_values=0.0, mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std],
        **window_args)
    labels = fn.lookup_table(labels, keys=list(range(256)), values=table.lut.tolist(),
                             default_value=IGNORE, dtype=types.UINT8)
    return images, labels, flags


class PairDaliSource:
    """Batches of one split's pairs through ``pair_pipeline``."""

    def __init__(self, split: PairSplit, recipe: PairRecipe, *, train: bool, batch_size: int,
                 threads: int, device: torch.device, on_corrupt: str, prefetch: int = _PREFETCH):
        self.split, self.recipe, self.train = split, recipe, train
        self.batch_size, self.threads, self.on_corrupt = batch_size, max(1, threads), on_corrupt
        self.prefetch = max(1, prefetch)
        self.skips: set[str] = set()     # label files ignored while reading (on_corrupt=skip)
        self.sizes = np.asarray(split.sizes, np.int64).reshape(-1, 2)
        self.ragged = len(set(split.sizes)) > 1
        self.device = torch.device("cpu")
        self.device_id = None
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)

    def batches(self, indices: np.ndarray, draws: np.ndarray | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of the pairs ``indices``, in order; ``draws`` (one row per sample,
        ``augment.py``) for training, None for whole validation images."""
        images = [self.split.images[i] for i in indices]
        labels = [self.split.labels[i] for i in indices]
        steps = -(-len(images) // self.batch_size)
        if steps == 0:
            return
        depth = min(self.prefetch, steps)
        feed = _feed(labels, self.sizes[indices], draws if self.train else None, self.recipe,
                     self.batch_size)
        pipe = pair_pipeline(images, feed, self.split.table, self.recipe, self.train,
                             self.ragged, self.device_id is not None,
                             batch_size=self.batch_size, num_threads=self.threads,
                             device_id=self.device_id, seed=0, prefetch_queue_depth=depth)
        step = 0
        try:
            pipe.schedule_run()   # queues `depth` runs; each later call queues one
            for step in range(steps):
                out_images, out_labels, flags = pipe.share_outputs()
                batch = self._to_torch(out_images), self._to_torch(out_labels)
                flags = np.asarray(flags.as_tensor()).reshape(-1)
                pipe.release_outputs()
                if step + depth < steps:
                    pipe.schedule_run()
                first = step * self.batch_size
                keep = min(self.batch_size, len(images) - first)   # trim the padded last batch
                x, y = batch[0][:keep], batch[1][:keep, ..., 0].long()   # labels: NHW1 → NHW
                if flags[:keep].any():
                    y = drop_illegal(y, flags[:keep], labels[first:first + keep],
                                     self.split.table, self.on_corrupt, self.skips)
                yield x, y
        except RuntimeError as err:
            raise self._decode_error(err, images, labels, step) from None

    def _to_torch(self, batch) -> torch.Tensor:
        dense = batch.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(dense, out, cuda_stream=stream)

    def _decode_error(self, err: RuntimeError, images: list[str], labels: list[str],
                      step: int) -> DataError:
        # The failing batch is the current one or one being prefetched: look only there.
        span = slice(step * self.batch_size, (step + self.prefetch + 2) * self.batch_size)
        window = [f for pair in zip(images[span], labels[span]) for f in pair]
        text = str(err)
        named = [f for f in window if re.search(re.escape(f) + r"\b", text)]
        culprit = named[0] if named else next((f for f in window if not decodes(f)), None)
        if culprit is not None:
            return DataError(f"cannot decode image: {culprit} ({_one_line_cause(err)}); "
                             "remove or replace the file")
        return DataError(f"DALI pipeline failed near {window[0] if window else '?'}: "
                         f"{_one_line_cause(err)}")
