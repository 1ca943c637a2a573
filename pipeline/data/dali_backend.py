"""DALI pipelines for the recipes, fed the encoded files of an explicit sample list per pass.

One pipeline per source (train / val), built at its first pass and reused by every later one
(train epochs, validation sweeps): its external source is fed batch by batch, in order, from
the rank's sample list (the order comes from ``order.py``), so it holds no file list and is
never rebuilt — a pipeline per pass left ~0.6 MB per pass in reference cycles until a full
garbage collection (``benchmarks/rss.py``). Files are read ahead on ``threads`` threads and
checked there (``layout.encoded_size``: marker structure, image size) before DALI sees them;
the crop windows and flips come from ``recipe.train_crops``, a function of the pass key and the
sample index only, so a pass started at ``start_step`` decodes exactly the batches
``start_step…`` of the uninterrupted pass. Runs are scheduled by hand, ``prefetch`` ahead and
only for the pass's batches; one pass at a time per source.

Without CUDA (``device`` is a CPU device) every operator runs on the CPU with
``device_id=None``; with a CUDA device the decoder is ``mixed`` (nvJPEG, on that GPU) and the
resize / crop / normalise stages run on the GPU, so images arrive on ``device``.

A file that fails the check, or that DALI's decoder refuses (the pipeline then fails; the
culprits are found by decoding the in-flight files again in halves, and the pass resumes at the
failed batch on a new pipeline), is handled by ``on_corrupt``: ``fail`` raises a ``DataError``
naming it; ``skip`` shows another image of the same batch in its place (``layout.stand_ins``),
logs the file once and counts it (``skips``); later passes leave it out without decoding it.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

from pipeline.data.layout import CorruptImage, DataError, DecodeSkips, read_encoded, stand_ins
from pipeline.data.recipe import Recipe, sample_draws, train_crops


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


def _cropped(encoded, anchor, shape, recipe: Recipe, decoder: str):
    if recipe.name == "imagenet":
        # Decoding only the crop window (ROI decode) is most of DALI's speed-up on the CPU.
        images = fn.decoders.image_slice(
            encoded, anchor, shape, device=decoder, axis_names="WH", normalized_anchor=False,
            normalized_shape=False, output_type=types.RGB, adjust_orientation=False,
            **_decoder_options(decoder))
        # Plain bilinear, as in NVIDIA's DALI ImageNet recipe (DeepLearningExamples): the
        # antialiasing filter took ~0.5 of ~3.5 CPU ms per image here, for a random training
        # crop. Validation keeps it, so both backends evaluate the same pixels.
        return fn.resize(images, resize_x=recipe.size, resize_y=recipe.size,
                         interp_type=types.INTERP_LINEAR, antialias=False)
    # cifar: the window reaches up to `pad` pixels outside the image, filled with zeros.
    return fn.slice(_decode(encoded, decoder), anchor, shape, axis_names="WH",
                    normalized_anchor=False, normalized_shape=False,
                    out_of_bounds_policy="pad", fill_values=0)


def _eval_view(images, recipe: Recipe, decoder: str):
    images = _decode(images, decoder)
    if recipe.name == "imagenet":
        images = fn.resize(images, resize_shorter=recipe.resize_shorter)
    return images


@pipeline_def
def recipe_pipeline(feed, recipe: Recipe, train: bool, gpu: bool):
    """``feed()`` returns the next batch: (encoded, anchor, shape, mirror) when ``train``,
    else (encoded,)."""
    decoder = "mixed" if gpu else "cpu"
    if train:
        encoded, anchor, shape, mirror = fn.external_source(
            source=feed, num_outputs=4, batch=True, ndim=[1, 1, 1, 0],
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
        images = _cropped(encoded, anchor, shape, recipe, decoder)
    else:
        encoded = fn.external_source(source=lambda: feed()[0], batch=True, ndim=1,
                                     dtype=types.UINT8)
        images, mirror = _eval_view(encoded, recipe, decoder), 0
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(recipe.size, recipe.size),
        out_of_bounds_policy="pad", fill_values=0.0, mirror=mirror,
        mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])


@pipeline_def
def _decode_pipeline(feed, gpu: bool):
    encoded = fn.external_source(source=feed, batch=True, ndim=1, dtype=types.UINT8)
    return _decode(encoded, "mixed" if gpu else "cpu")


def _one_line_cause(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
    return (after or lines or [type(err).__name__])[0]


def _read(path: str, refused: dict[str, str]):
    """(bytes, size) of the file, or the CorruptImage saying why it cannot be used."""
    if path in refused:
        return CorruptImage(refused[path])
    try:
        return read_encoded(path)
    except CorruptImage as err:
        return err


class PassSuperseded(RuntimeError):
    """An unfinished pass resumed after a later pass of its source began."""


class _Feed:
    """Batches of one pass from ``step`` on, for the pipeline's external source; files are
    read ``ahead`` batches in advance on ``pool``."""

    def __init__(self, source: DaliSource, indices: np.ndarray, key: int, step: int,
                 pool: ThreadPoolExecutor, ahead: int):
        self.source, self.indices, self.key, self.pool = source, indices, key, pool
        self.next, self.ahead = step, ahead
        self.reads: dict[int, list] = {}
        self.labels: dict[int, torch.Tensor] = {}
        self.slots: dict[int, list[int]] = {}

    def _submit(self, step: int) -> None:
        bs = self.source.batch_size
        if step not in self.reads and step * bs < len(self.indices):
            paths = [self.source.files[i] for i in self.indices[step * bs:(step + 1) * bs]]
            self.reads[step] = [self.pool.submit(_read, p, self.source.refused) for p in paths]

    def __call__(self):
        # A new pipeline queues `prefetch` runs at once: past the pass's end it is given the
        # last batch again, decoded and dropped (DaliSource._drain).
        last = -(-len(self.indices) // self.source.batch_size) - 1
        step = min(self.next, last)
        self.next += 1
        for k in range(step, step + self.ahead + 1):
            self._submit(k)
        reads = [f.result() for f in self.reads.pop(step)]
        src = self.source
        chunk = self.indices[step * src.batch_size:(step + 1) * src.batch_size]
        errors = [str(r) if isinstance(r, CorruptImage) else None for r in reads]
        shown = stand_ins([src.files[i] for i in chunk], errors, src.on_corrupt)
        for i, error in zip(chunk, errors):
            if error is not None:
                src.skips.note(src.files[i], error)
        self.slots[step] = [int(chunk[s]) for s in shown]
        self.labels[step] = torch.tensor([src.labels[chunk[s]] for s in shown])
        encoded = [np.frombuffer(reads[s][0], np.uint8) for s in shown]
        if not src.train:
            return (encoded,)
        crops = train_crops(src.recipe, sample_draws(self.key, chunk), [reads[s][1] for s in shown])
        return (encoded, np.stack([crops.x, crops.y], 1).astype(np.float32),
                np.stack([crops.w, crops.h], 1).astype(np.float32), crops.flip.astype(np.int32))


class DaliSource:
    """Batches of one split's files through the DALI recipe pipeline."""

    def __init__(self, files: list[str], labels: list[int], recipe: Recipe, *, train: bool,
                 batch_size: int, threads: int, prefetch: int, device: torch.device,
                 on_corrupt: str):
        self.files, self.labels = files, labels
        self.recipe, self.train, self.batch_size = recipe, train, batch_size
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
        self.on_corrupt = on_corrupt
        self.skips = DecodeSkips()
        self.refused: dict[str, str] = {}   # files DALI's decoder refused: path → cause
        self.device = device
        # One pipeline and one reading pool for every pass (a pipeline per pass left ~0.6 MB
        # per pass in reference cycles until a full garbage collection: benchmarks/rss.py).
        self.pool: ThreadPoolExecutor | None = None
        self.pipe = None
        self.feed: _Feed | None = None   # the running pass, read by the pipeline's source
        self.queued = 0                  # runs scheduled and not yet consumed
        self.pass_id = 0
        self.device_id = None
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()

    def batches(self, indices: np.ndarray, key: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) for the samples ``indices``, in order, on the source's device;
        ``key`` seeds the per-sample augmentation (``recipe.sample_draws``)."""
        steps = -(-len(indices) // self.batch_size)
        step = 0
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-read")
        while step < steps:
            feed = _Feed(self, indices, key, step, self.pool, self.prefetch)
            try:
                for images in self._run(feed, steps - step):
                    yield images, feed.labels.pop(step).to(self.device, non_blocking=True)
                    feed.slots.pop(step)
                    step += 1
            except PassSuperseded:
                raise
            except RuntimeError as err:   # DALI's error: the pipeline does not run again
                self.pipe, self.queued = None, 0
                self._handle_refusal(err, feed, step)

    def _next_batch(self):
        return self.feed()

    def _run(self, feed: _Feed, steps: int) -> Iterator[torch.Tensor]:
        """Decode the ``steps`` batches ``feed`` gives, keeping ``prefetch`` runs queued (and
        no more than the pass needs, except on a new pipeline: see ``_Feed``)."""
        self._drain()
        self.feed = feed
        pass_id = self.pass_id = self.pass_id + 1
        if self.pipe is None:
            self.pipe = recipe_pipeline(
                self._next_batch, self.recipe, self.train, self.device_id is not None,
                batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                prefetch_queue_depth=self.prefetch)
            self.pipe.schedule_run()   # a new pipeline's first call queues `prefetch` runs
            self.queued = self.prefetch
        for _ in range(min(self.prefetch, steps) - self.queued):
            self.pipe.schedule_run()
            self.queued += 1
        for k in range(steps):
            if pass_id != self.pass_id:
                raise PassSuperseded("a later pass of this DALI source started while this one "
                                     "was unfinished: iterate one pass at a time")
            (images,) = self.pipe.share_outputs()
            out = self._to_torch(images)
            self.pipe.release_outputs()
            self.queued -= 1
            if k + 1 + self.queued < steps:
                self.pipe.schedule_run()
                self.queued += 1
            yield out
        self._drain()

    def _drain(self) -> None:
        """Consume runs still queued: the fillers of a short first pass, or the prefetched
        batches of a pass left unfinished (a truncated epoch)."""
        while self.queued:
            self.pipe.share_outputs()
            self.pipe.release_outputs()
            self.queued -= 1

    def _to_torch(self, batch) -> torch.Tensor:
        dense = batch.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(dense, out, cuda_stream=stream)

    def _decodes(self, paths: list[str]) -> bool:
        datas = [np.fromfile(p, np.uint8) for p in paths]
        pipe = _decode_pipeline(lambda: datas, self.device_id is not None,
                                batch_size=len(datas), num_threads=self.threads,
                                device_id=self.device_id, prefetch_queue_depth=1)
        try:
            pipe.run()
            return True
        except RuntimeError:
            return False

    def _refused_among(self, paths: list[str]) -> list[str]:
        if not paths or self._decodes(paths):
            return []
        if len(paths) == 1:
            return paths
        half = len(paths) // 2
        return self._refused_among(paths[:half]) + self._refused_among(paths[half:])

    def _handle_refusal(self, err: RuntimeError, feed: _Feed, step: int) -> None:
        """After DALI failed at ``step``: find the in-flight files its decoder refuses; raise
        (fail mode, or none found) or record them so that the pass resumes without them."""
        in_flight = sorted({self.files[i] for k, slots in feed.slots.items() for i in slots})
        cause = _one_line_cause(err).rstrip(" :")
        refused = self._refused_among(in_flight)
        if not refused:
            raise DataError(f"DALI pipeline failed near {in_flight[0] if in_flight else '?'}: "
                            f"{cause}") from None
        if self.on_corrupt == "fail":
            raise DataError(f"cannot decode image: {refused[0]} ({cause}); remove or replace "
                            "the file, or set data.on_corrupt=skip") from None
        for path in refused:
            self.refused[path] = f"DALI cannot decode it: {cause}"
