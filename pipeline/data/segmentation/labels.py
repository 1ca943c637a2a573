"""What the values in a label file mean: file value → train id tables, and PNG label headers.

A ``LabelTable`` maps every 8-bit value a label file may hold to a train id (0 … C−1, or 255 =
ignored) and knows which values are legal at all, so a value outside the dataset's table is an
error naming the file instead of a silent "ignore".

* Cityscapes ``*_gtFine_labelIds.png``: the label ids of ``cityscapesscripts.helpers.labels``
  (0 … 33), each mapped to its ``trainId``; every class with ``ignoreInEval`` has train id 255.
  License plate (id −1) never appears in a label file: ``json2labelImg`` skips polygons with a
  negative id, so plate pixels keep the id of the car under them.
* Cityscapes ``*_gtFine_labelTrainIds.png`` (from ``csCreateTrainIdLabelImgs``): 0 … 18 and 255.
* Pascal VOC 2012: class indices 0 … 20 and 255 (border / void), stored as palette PNGs whose
  pixel values are the indices (the colours are for display only).

DALI's PNG decoder expands a palette to its colours; ``palette_as_grey`` re-types such a file
in memory as 8-bit greyscale (same pixel data, no palette), which decodes to the indices.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS, trainId2label
from PIL import Image

from pipeline.data.layout import DataError

IGNORE = 255
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types
GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@dataclass(frozen=True)
class LabelTable:
    classes: tuple[str, ...]     # train-id names, index = train id
    lut: np.ndarray              # [256] uint8: file value → train id (255 = ignore)
    legal: np.ndarray            # [256] bool: values a label file may contain
    description: str             # the legal values, for error messages

    def illegal_values(self, label: np.ndarray) -> list[int]:
        """The values of ``label`` (uint8) outside the table, sorted."""
        present = np.bincount(label.reshape(-1), minlength=256).astype(bool)
        return np.flatnonzero(present & ~self.legal).tolist()


def _table(pairs: dict[int, int], classes: tuple[str, ...], description: str) -> LabelTable:
    lut = np.full(256, IGNORE, np.uint8)
    legal = np.zeros(256, bool)
    for value, train_id in pairs.items():
        lut[value] = train_id if 0 <= train_id < len(classes) else IGNORE
        legal[value] = True
    return LabelTable(classes, lut, legal, description)


def cityscapes_classes() -> tuple[str, ...]:
    """The 19 evaluated Cityscapes classes, by train id."""
    count = 1 + max(label.trainId for label in CITYSCAPES_LABELS if label.trainId != IGNORE)
    return tuple(trainId2label[t].name for t in range(count))


def cityscapes_label_ids() -> LabelTable:
    classes = cityscapes_classes()
    ids = {label.id: label.trainId for label in CITYSCAPES_LABELS if label.id >= 0}
    return _table(ids, classes, f"Cityscapes label ids 0–{max(ids)}")


def cityscapes_train_ids() -> LabelTable:
    classes = cityscapes_classes()
    ids = {t: t for t in range(len(classes))} | {IGNORE: IGNORE}
    return _table(ids, classes, f"Cityscapes train ids 0–{len(classes) - 1} and 255")


def voc_indices() -> LabelTable:
    ids = {c: c for c in range(len(VOC_CLASSES))} | {IGNORE: IGNORE}
    return _table(ids, VOC_CLASSES, f"VOC class indices 0–{len(VOC_CLASSES) - 1} and 255")


def illegal_label_error(path: str, table: LabelTable) -> DataError:
    """The one-line error for a label file holding values outside ``table``."""
    with Image.open(path) as im:
        values = table.illegal_values(np.asarray(im))
    return DataError(f"label values {values[:8]} outside the table ({table.description}) in "
                     f"{path}; set data.on_corrupt=skip to ignore such labels")


def drop_illegal(labels: torch.Tensor, flags: np.ndarray, files: list[str], table: LabelTable,
                 on_corrupt: str, skips: set[str]) -> torch.Tensor:
    """A batch's labels after its flagged samples (values outside ``table``): raise a DataError
    naming the first file, or (on_corrupt=skip) ignore those samples' every pixel and add
    their files to ``skips``."""
    bad = [f for f, flag in zip(files, flags) if flag]
    if on_corrupt == "fail":
        raise illegal_label_error(bad[0], table)
    skips.update(bad)
    mask = torch.from_numpy(np.asarray(flags, bool)).to(labels.device)
    return labels.masked_fill(mask[:, None, None], IGNORE)


def train_id_to_label_id() -> np.ndarray:
    """[256] uint8: Cityscapes train id → label id (what the official evaluation reads);
    255 and any unused value → 0 (unlabeled)."""
    lut = np.zeros(256, np.uint8)
    for train_id in range(len(cityscapes_classes())):
        lut[train_id] = trainId2label[train_id].id
    return lut


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    colour_type: int


def png_header(path: str) -> PngHeader | None:
    """The IHDR fields of a PNG file (33 bytes read), or None if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return PngHeader(width, height, depth, colour)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_as_grey(png: bytes) -> bytes:
    """An 8-bit palette PNG re-typed as 8-bit greyscale: same image data, whose values are the
    palette indices. Keeps IHDR (colour type changed), the IDAT chunks and IEND; drops the
    palette and every chunk whose meaning depends on it (PLTE, tRNS, bKGD, hIST, sBIT, …)."""
    header = bytearray(png[16:29])
    header[9] = GREY
    out = [PNG_SIGNATURE, _chunk(b"IHDR", bytes(header))]
    pos = 8
    while pos + 8 <= len(png):
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        kind = png[pos + 4:pos + 8]
        end = pos + 12 + length
        if kind in (b"IDAT", b"IEND"):
            out.append(png[pos:end])
        if kind == b"IEND":
            break
        pos = end
    return b"".join(out)
