"""The ImageNet folder layout ``ROOT/{train,val}/<class>/<image>``, and what counts as corrupt.

Every regular, non-hidden file in a class folder is a sample (hidden files such as
``.DS_Store`` are ignored); classes are the sorted train folder names, as in ImageFolder.
Listing the tree and caching the listing is ``index.py``; this module turns a listing into file
lists (``layout_from_listing``) and holds the per-file checks.

Corrupt files are found at three points, each as cheap as its place allows:
  * scan (``check_file``, once per file, its result kept in the scan index): the first 16 bytes
    must carry the magic number of a format both decoders read (JPEG, PNG, BMP, TIFF, WebP), and
    a JPEG must end in its EOI marker (a PNG in its IEND chunk) within the last 64 bytes. One
    open and two small reads, ~15 µs per cached file; only a file failing the tail check is
    fully decoded (PIL) to confirm (a valid JPEG with trailing bytes after EOI is kept).
    Caught: empty files, non-images (text, HTML, archives), unsupported formats (GIF), truncated
    JPEG/PNG files.
  * decode (``encoded_size`` on the bytes each backend reads, then the backend's decoder): a
    JPEG's marker structure is walked — every marker before the image data and between scans
    must be one a decoder accepts, and the image data may hold only byte stuffing, restart
    markers and the end marker. This catches damage inside the compressed data that libjpeg
    stops on ("unsupported marker") but that DALI's CPU decoder silently decodes, so that both
    backends drop the same files; the decoder then catches the rest (garbage tables, bodies).
    ~30 µs per 110 KB file, beside ~1.6 ms to decode it.
  * ``pipeline data check ROOT``: a full decode of every file, in parallel.
Not caught anywhere short of a strict decode or a checksum: compressed data that ends early with
an end marker appended, or damage that keeps the stream well-formed; every decoder fills or
garbles those pixels silently, the same way in both backends.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.errors import InputError

SPLITS = ("train", "val")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")
_TAIL_BYTES = 64
log = logging.getLogger("pipeline")


class DataError(InputError):
    """A problem with the dataset on disk; the message is one line naming the path or class."""


class CorruptImage(ValueError):
    """An image's bytes are broken; the message says how (the caller names the file)."""


@dataclass(frozen=True)
class Split:
    files: list[str]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)   # corrupt files dropped (on_corrupt=skip)

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Layout:
    root: str
    classes: list[str]
    train: Split
    val: Split

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + self.val.skipped


# ---- scan-time check -----------------------------------------------------------------------------

def _is_image_head(head: bytes) -> bool:
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _tail_complete(head: bytes, tail: bytes) -> bool:
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" in tail
    return True


def decodes(path: str) -> bool:
    """Whether PIL decodes the whole file (the expensive check, for suspects only)."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, … for broken data
        return False


def check_file(path: str) -> tuple[int, int, bool]:
    """``(size, mtime_ns, readable)`` of one file: the scan-time check in the module docstring."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(16)
            if not _is_image_head(head):
                return st.st_size, st.st_mtime_ns, False
            f.seek(max(0, st.st_size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return 0, 0, False
    return st.st_size, st.st_mtime_ns, _tail_complete(head, tail) or decodes(path)


def is_readable_image(path: str) -> bool:
    return check_file(path)[2]


# ---- decode-time check ---------------------------------------------------------------------------

# After 0xFF inside compressed data: stuffing (0x00), fill (0xFF) and restart markers continue it.
_IN_SCAN = np.zeros(256, bool)
_IN_SCAN[[0x00, 0xFF, *range(0xD0, 0xD8)]] = True
# Segments a decoder reads before and between scans (tables, restart interval, APPn, COM, DNL).
_TABLES = {0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}
_FRAMES = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}   # SOF0–SOF15
_SOS, _EOI = 0xDA, 0xD9


def _segment_end(data: bytes, pos: int) -> int:
    """End of the marker segment whose marker byte is at ``pos``."""
    if pos + 3 > len(data):
        raise CorruptImage(f"segment header cut at byte {pos}")
    end = pos + 1 + int.from_bytes(data[pos + 1:pos + 3], "big")
    if end > len(data) or end < pos + 3:
        raise CorruptImage(f"segment at byte {pos} overruns the file")
    return end


def _jpeg_size(data: bytes) -> tuple[int, int]:
    size = None
    pos = 2
    scan_markers = None   # marker positions after the first scan header, found with numpy
    while True:
        if scan_markers is None:
            while pos < len(data) and data[pos] == 0xFF:   # fill bytes before a marker
                pos += 1
            if pos >= len(data) or data[pos - 1] != 0xFF:
                raise CorruptImage(f"no marker at byte {pos}")
        marker = data[pos]
        if marker == _EOI:
            if size is None:
                raise CorruptImage("no frame header before the end marker")
            return size
        if marker not in _TABLES and marker not in _FRAMES and marker != _SOS:
            raise CorruptImage(f"unexpected marker 0x{marker:02X} at byte {pos}")
        end = _segment_end(data, pos)
        if marker in _FRAMES:
            if end < pos + 8:
                raise CorruptImage(f"frame header at byte {pos} too short")
            if size is not None:
                raise CorruptImage(f"second frame header at byte {pos}")
            size = (int.from_bytes(data[pos + 6:pos + 8], "big"),
                    int.from_bytes(data[pos + 4:pos + 6], "big"))
        if marker == _SOS:
            if size is None:
                raise CorruptImage("image data before the frame header")
            if scan_markers is None:
                body = np.frombuffer(data, np.uint8)
                ff = np.flatnonzero(body[end:-1] == 0xFF) + end
                scan_markers = ff[~_IN_SCAN[body[ff + 1]]] + 1
        if scan_markers is None:
            pos = end
            continue
        later = scan_markers[np.searchsorted(scan_markers, end):]
        if not len(later):
            raise CorruptImage("no end marker after the image data")
        pos = int(later[0])


def encoded_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, raising CorruptImage for the decode-time check
    of the module docstring (JPEG: its marker structure; other formats: PIL's header parse)."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if not _is_image_head(data[:16]):
        raise CorruptImage("not an image of a supported format")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, … for bad headers
        raise CorruptImage(f"{type(err).__name__}: {err}") from None


def read_encoded(path: str) -> tuple[bytes, tuple[int, int]]:
    """The file's bytes and image size; CorruptImage if unreadable or broken."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CorruptImage(f"cannot read: {err.strerror}") from None
    return data, encoded_size(data)


# ---- listing → file lists ------------------------------------------------------------------------

def split_from_listing(split_dir: str, classes: list[str], folders: list,
                       on_corrupt: str) -> Split:
    """File lists of one listed split; ``folders`` as in ``layout_from_listing``."""
    files: list[str] = []
    labels: list[int] = []
    bad: list[str] = []
    for label, (name, listed) in enumerate(zip(classes, folders)):
        folder = os.path.join(split_dir, name)
        if not listed.names:
            raise DataError(f"empty class folder: {folder}")
        prefix = folder + os.sep   # (os.path.join per file: ~1 s at ImageNet scale)
        if listed.readable.all():
            kept = [prefix + f for f in listed.names]
        else:
            ok = listed.readable.tolist()
            kept = [prefix + f for f, good in zip(listed.names, ok) if good]
            bad += [prefix + f for f, good in zip(listed.names, ok) if not good]
        if not kept and on_corrupt == "skip":
            raise DataError(f"empty class folder (every file corrupt): {folder}")
        files += kept
        labels += [label] * len(kept)
    if bad and on_corrupt == "fail":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"corrupt or non-image file: {bad[0]}{more}; set data.on_corrupt=skip "
                        f"to drop such files")
    return Split(files, labels, bad)


def layout_from_listing(root: str, classes: list[str], folders: dict[str, list],
                        on_corrupt: str) -> Layout:
    """File lists of a listed tree; ``folders[split]`` holds per class an object with the file
    ``names`` and the scan check's ``readable`` verdicts (``index.ClassFolder``)."""
    if on_corrupt not in ("fail", "skip"):
        raise DataError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    return Layout(root, classes, *(
        split_from_listing(os.path.join(root, s), classes, folders[s], on_corrupt)
        for s in SPLITS))


# ---- corrupt files met at decode time ------------------------------------------------------------

def stand_ins(paths: list[str], errors: list[str | None], on_corrupt: str) -> list[int]:
    """For each slot of a batch, the slot whose image it shows: itself when its file is usable
    (``errors[i] is None``), else the next usable slot, cyclically — so a batch keeps its size
    and every rank its step count. In fail mode the first unusable file raises a DataError."""
    good = [i for i, e in enumerate(errors) if e is None]
    bad = [i for i, e in enumerate(errors) if e is not None]
    if bad and on_corrupt == "fail":
        raise DataError(f"cannot decode image: {paths[bad[0]]} ({errors[bad[0]]}); remove or "
                        "replace the file, or set data.on_corrupt=skip")
    if not good:
        raise DataError(f"every image of a batch is corrupt ({paths[0]} and {len(paths) - 1} "
                        "more): check the dataset with `pipeline data check ROOT`")
    return [i if e is None else next((g for g in good if g > i), good[0])
            for i, e in enumerate(errors)]


class DecodeSkips:
    """Files dropped at decode time (on_corrupt=skip): each logged once, by name, and counted."""

    def __init__(self) -> None:
        self.files: set[str] = set()

    def note(self, path: str, reason: str) -> None:
        if path not in self.files:
            self.files.add(path)
            log.warning("skipped a corrupt image at decode time: %s (%s)", path, reason)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        return iter(self.files)


def verify_file(path: str) -> str | None:
    """Why the file is unusable (decode-time check plus a full PIL decode), or None."""
    try:
        data, _ = read_encoded(path)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except CorruptImage as err:
        return str(err)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, … for bad data
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None
