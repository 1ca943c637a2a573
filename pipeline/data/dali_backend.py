"""DALI pipelines for the recipes, fed an explicit file list per pass.

Each pass (a train epoch, or one validation sweep) builds a fresh pipeline whose
``readers.file(files=…, labels=…)`` reads exactly the rank's list in order (no reader shuffle:
the order comes from ``order.py``). A rebuild costs ~40 ms for a list of 512 files, ~0.5 s for
100k and ~1.7 s for a million (measured here), small beside an epoch over them. Runs are
scheduled by hand, only for the list's batches, so no decoding is thrown away at its end.

Without CUDA (``device`` is a CPU device) every operator runs on the CPU with
``device_id=None``; with a CUDA device the decoder is ``mixed`` (nvJPEG, on that GPU) and the
resize / crop / normalise stages run on the GPU, so batches arrive on ``device``.
A decode failure is turned into a ``DataError`` naming the file.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

from pipeline.data.layout import DataError, decodes
from pipeline.data.recipe import Recipe

_PREFETCH = 2


def _decoder_options(decoder: str) -> dict:
    # nvJPEG buffers sized for full-size ImageNet images up front, as NVIDIA's recipe does, so
    # that the mixed decoder does not reallocate during the first epoch.
    if decoder == "mixed":
        return dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)
    return {}


def _decode(encoded, decoder: str):
    # EXIF orientation is ignored, as PIL-based ImageFolder loading does.
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB,
                             adjust_orientation=False, **_decoder_options(decoder))


def _augmented_crop(images, recipe: Recipe, decoder: str):
    if recipe.name == "imagenet":
        # Decoding only the random window (ROI decode) is most of DALI's speed-up on the CPU.
        images = fn.decoders.image_random_crop(
            images, device=decoder, output_type=types.RGB, adjust_orientation=False,
            random_area=list(recipe.scale), random_aspect_ratio=list(recipe.ratio),
            num_attempts=10, **_decoder_options(decoder))
        # Plain bilinear, as in NVIDIA's DALI ImageNet recipe (DeepLearningExamples): the
        # antialiasing filter took ~0.5 of ~3.5 CPU ms per image here, for a random training
        # crop. Validation keeps it, so both backends evaluate the same pixels.
        return fn.resize(images, resize_x=recipe.size, resize_y=recipe.size,
                         interp_type=types.INTERP_LINEAR, antialias=False)
    images = _decode(images, decoder)
    # Pad `pad` zeros on each side, then crop `size` at a uniform integer offset: the anchor in
    # the unpadded image's coordinates lies in [-pad, extent + pad - size].
    extent = fn.cast(images.shape(), dtype=types.FLOAT)
    span = fn.stack(extent[1], extent[0]) + float(2 * recipe.pad - recipe.size + 1)
    anchor = dmath.floor(fn.random.uniform(range=[0.0, 1.0], shape=2) * span) - float(recipe.pad)
    return fn.slice(images, anchor, np.array([recipe.size, recipe.size], np.float32),
                    axis_names="WH", out_of_bounds_policy="pad", fill_values=0,
                    normalized_anchor=False, normalized_shape=False)


def _eval_view(images, recipe: Recipe, decoder: str):
    images = _decode(images, decoder)
    if recipe.name == "imagenet":
        images = fn.resize(images, resize_shorter=recipe.resize_shorter)
    return images


@pipeline_def
def recipe_pipeline(files: list[str], labels: list[int], recipe: Recipe, train: bool, gpu: bool):
    encoded, labels = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                      pad_last_batch=not train)
    decoder = "mixed" if gpu else "cpu"
    if train:
        images, mirror = _augmented_crop(encoded, recipe, decoder), fn.random.coin_flip()
    else:
        images, mirror = _eval_view(encoded, recipe, decoder), 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(recipe.size, recipe.size),
        out_of_bounds_policy="pad", fill_values=0.0, mirror=mirror,
        mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])
    return images, (labels.gpu() if gpu else labels)


def _one_line_cause(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
    return (after or lines or [type(err).__name__])[0]


class DaliSource:
    """Batches of one split's files through the DALI recipe pipeline."""

    def __init__(self, files: list[str], labels: list[int], recipe: Recipe, *, train: bool,
                 batch_size: int, threads: int, device: torch.device):
        self.files, self.labels = files, labels
        self.recipe, self.train, self.batch_size = recipe, train, batch_size
        self.threads = max(1, threads)
        self.device_id = None
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()

    def batches(self, indices: np.ndarray, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) for the samples ``indices``, in order, on the source's device."""
        files = [self.files[i] for i in indices]
        steps = -(-len(files) // self.batch_size)
        if steps == 0:
            return
        depth = min(_PREFETCH, steps)
        pipe = recipe_pipeline(
            files, [self.labels[i] for i in indices], self.recipe, self.train,
            self.device_id is not None, batch_size=self.batch_size, num_threads=self.threads,
            device_id=self.device_id, seed=seed, prefetch_queue_depth=depth)
        step = 0
        try:
            # Runs are scheduled only for batches of this list (DALI's iterators schedule past
            # its end, decoding batches that a rebuilt pipeline throws away). The first call
            # queues `depth` runs, each later one a single run.
            pipe.schedule_run()
            for step in range(steps):
                images, labels = pipe.share_outputs()
                batch = self._to_torch(images), self._to_torch(labels).reshape(-1).long()
                pipe.release_outputs()
                if step + depth < steps:
                    pipe.schedule_run()
                # A validation list ends in a partial batch, padded by the reader: trim it.
                keep = min(self.batch_size, len(files) - step * self.batch_size)
                yield batch[0][:keep], batch[1][:keep]
        except RuntimeError as err:
            raise self._decode_error(err, files, step) from None

    def _to_torch(self, batch) -> torch.Tensor:
        dense = batch.as_tensor()
        device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        return feed_ndarray(dense, out, cuda_stream=stream)

    def _decode_error(self, err: RuntimeError, files: list[str], step: int) -> DataError:
        # The failing batch is the current one or one being prefetched: look only there.
        window = files[step * self.batch_size:(step + _PREFETCH + 2) * self.batch_size]
        text = str(err)
        named = [f for f in window if re.search(re.escape(f) + r"\b", text)]
        culprit = named[0] if named else next((f for f in window if not decodes(f)), None)
        if culprit is not None:
            return DataError(f"cannot decode image: {culprit} ({_one_line_cause(err)}); "
                             "remove or replace the file")
        return DataError(f"DALI pipeline failed near {window[0] if window else '?'}: "
                         f"{_one_line_cause(err)}")
