"""The scan index: a dataset tree listed once — every file with its size, mtime and the scan-time
corrupt check's verdict — and reused by every rank and restart while the tree is unchanged.

Listing ImageNet means opening 1.33 M files (the check reads each one's head and tail): 30–90 µs
per file, minutes per start, on every rank. The index (``data-index.npz``: names, sizes,
mtimes, verdicts, compressed NumPy arrays, no pickle) makes a later start read one file and stat
the 2 split and ~2,000 class folders.

Unchanged means: every folder's mtime_ns equals the recorded one. Adding, removing or renaming
a file changes its folder's mtime, so this is exact for those. Limits: a file rewritten in place
under the same name leaves its folder's mtime alone and is not noticed (a broken rewrite is
still caught at decode time; ``pipeline data index ROOT --rebuild`` re-checks everything); a
folder changed within ``_RACY_NS`` of the listing (coarse filesystem timestamps) is not trusted
and listed again at the next start. A stale index is updated, not rebuilt: unchanged folders are
kept, changed ones listed again, and of their files only those whose size or mtime differ (or
that are new) are checked again.

Where: ``index_dir`` (the run directory) or, when written by ``pipeline data index ROOT``,
ROOT itself; a start looks in both and writes to ``index_dir``. Ranks start together before any
process group exists: they take an exclusive ``fcntl`` lock on ``data-index.npz.lock``; the
first builds and writes the index (temporary file + rename, so a reader never sees half a
file), the others wait and then read it. Where the filesystem refuses locks, each rank builds
its own listing and the writes stay atomic.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data.layout import (SPLITS, DataError, Layout, Split, check_file,
                                   layout_from_listing, split_from_listing, verify_file)

INDEX_NAME = "data-index.npz"
_VERSION = 1
_RACY_NS = 2_000_000_000
_THREADS = 8
_CHUNK = 512   # files per task of `pipeline data check`
log = logging.getLogger("pipeline")


@dataclass
class ClassFolder:
    """One listed class folder: its mtime and, per visible file, name, size, mtime, verdict."""
    mtime: int
    names: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    readable: np.ndarray


@dataclass
class Listing:
    root: str                                  # absolute
    classes: list[str]
    split_mtimes: dict[str, int]
    folders: dict[str, list[ClassFolder]]      # split → one per class
    listed_at: int                             # time.time_ns() when the listing started


# ---- listing the tree ----------------------------------------------------------------------------

def _visible(folder: str, dirs: bool) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it
                      if not e.name.startswith(".") and (e.is_dir() if dirs else e.is_file()))


def _class_names(split_dir: str) -> list[str]:
    if not os.path.isdir(split_dir):
        raise DataError(f"missing split folder: {split_dir}")
    names = _visible(split_dir, dirs=True)
    if not names:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image>)")
    return names


def _classes(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DataError(f"data root not found: {root} (expected {root}/{{train,val}}/<class>/<image>)")
    classes = _class_names(os.path.join(root, "train"))
    val_classes = _class_names(os.path.join(root, "val"))
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        parts = ([f"missing {missing[:5]}"] if missing else []) + \
            ([f"not in train {extra[:5]}"] if extra else [])
        raise DataError(f"class folders of {os.path.join(root, 'val')} differ from train: "
                        f"{', '.join(parts)}")
    return classes


def _verdict(path: str, known: tuple | None) -> tuple[int, int, bool]:
    if known is not None:
        try:
            st = os.stat(path)
        except OSError:
            return 0, 0, False
        if (st.st_size, st.st_mtime_ns) == known[:2]:
            return known
    return check_file(path)


def _list_folder(folder: str, mtime: int, before: ClassFolder | None) -> ClassFolder:
    """List one class folder; files whose size and mtime match ``before`` keep its verdict."""
    names = _visible(folder, dirs=False)
    known = {} if before is None else dict(zip(before.names, zip(
        before.sizes.tolist(), before.mtimes.tolist(), before.readable.tolist())))
    verdicts = [_verdict(os.path.join(folder, n), known.get(n)) for n in names]
    sizes, mtimes, ok = zip(*verdicts) if verdicts else ((), (), ())
    return ClassFolder(mtime, names, np.array(sizes, np.int64), np.array(mtimes, np.int64),
                       np.array(ok, bool))


def _stable(recorded: int, mtime: int, listed_at: int) -> bool:
    return recorded == mtime and mtime < listed_at - _RACY_NS


def list_tree(root: str, previous: Listing | None = None, progress: bool = False) -> Listing:
    """List ``root``, reusing what ``previous`` (an older listing of it) still describes."""
    listed_at = time.time_ns()
    classes = _classes(root)
    listing = Listing(os.path.abspath(root), classes, {}, {}, listed_at)
    todo = []   # (split, label, folder, mtime, previous record) of folders to list again
    for split in SPLITS:
        listing.split_mtimes[split] = os.stat(os.path.join(root, split)).st_mtime_ns
        old = dict(zip(previous.classes, previous.folders[split])) if previous else {}
        listing.folders[split] = []
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            mtime = os.stat(folder).st_mtime_ns
            before = old.get(name)
            current = before is not None and _stable(before.mtime, mtime, previous.listed_at)
            listing.folders[split].append(before if current else None)
            if not current:
                todo.append((split, label, folder, mtime, before))
    # The checks are mostly system calls, which release the GIL: threads hide filesystem
    # latency. One task per class folder keeps no per-file bookkeeping alive.
    with ThreadPoolExecutor(_THREADS) as pool, tqdm(
            total=len(todo), desc="listing class folders", unit="folder",
            disable=not progress or None) as bar:
        for (split, label, *_), record in zip(todo, pool.map(lambda t: _list_folder(*t[2:]), todo)):
            listing.folders[split][label] = record
            bar.update()
    return listing


def is_fresh(listing: Listing, root: str) -> bool:
    """Whether ``listing`` still describes ``root`` (the folder mtimes of the module docstring)."""
    try:
        for split in SPLITS:
            split_dir = os.path.join(root, split)
            if not _stable(listing.split_mtimes[split], os.stat(split_dir).st_mtime_ns,
                           listing.listed_at):
                return False
            for name, folder in zip(listing.classes, listing.folders[split]):
                mtime = os.stat(os.path.join(split_dir, name)).st_mtime_ns
                if not _stable(folder.mtime, mtime, listing.listed_at):
                    return False
    except OSError:
        return False
    return True


# ---- the index file ------------------------------------------------------------------------------

def write_listing(listing: Listing, path: Path) -> None:
    """Write atomically: a temporary file beside ``path``, renamed over it."""
    meta = {"version": _VERSION, "root": listing.root, "classes": listing.classes,
            "split_mtimes": listing.split_mtimes, "listed_at": listing.listed_at,
            "folder_mtimes": {s: [f.mtime for f in fs] for s, fs in listing.folders.items()}}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for split, folders in listing.folders.items():
        names = "\0".join(n for f in folders for n in f.names)
        arrays[f"{split}_names"] = np.frombuffer(names.encode("utf-8", "surrogateescape"), np.uint8)
        arrays[f"{split}_counts"] = np.array([len(f.names) for f in folders], np.int64)
        for key in ("sizes", "mtimes", "readable"):
            arrays[f"{split}_{key}"] = np.concatenate(
                [getattr(f, key) for f in folders]) if folders else np.empty(0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)   # mkstemp's 0600 would hide a dataset's index from other users
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_listing(path: Path, root: str) -> Listing | None:
    """The listing of ``root`` in ``path``; None if absent, unreadable, of another format
    version or of another root."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != _VERSION or meta["root"] != os.path.abspath(root):
                return None
            folders = {}
            for split in SPLITS:
                raw = z[f"{split}_names"].tobytes().decode("utf-8", "surrogateescape")
                names = raw.split("\0") if raw else []
                bounds = np.cumsum(np.concatenate([[0], z[f"{split}_counts"]])).tolist()
                columns = [z[f"{split}_{k}"] for k in ("sizes", "mtimes", "readable")]
                folders[split] = [
                    ClassFolder(mtime, names[a:b], *(c[a:b] for c in columns))
                    for mtime, a, b in zip(meta["folder_mtimes"][split], bounds, bounds[1:])]
    except (OSError, ValueError, KeyError):
        return None
    return Listing(meta["root"], meta["classes"], meta["split_mtimes"], folders,
                   meta["listed_at"])


@contextmanager
def _exclusive(path: Path):
    """Hold an fcntl lock on ``path``.lock; yields whether ``path``'s folder is writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(f"{path}.lock", "a")
    except OSError as err:
        log.warning("cannot write the scan index in %s (%s): listing without it",
                    path.parent, err.strerror)
        yield False
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("no file lock on %s (%s): ranks list the tree each", path, err.strerror)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _candidates(root: str, index_dir: str | Path | None) -> list[Path]:
    """Where an index of ``root`` may be: ``index_dir`` first, then ROOT itself."""
    paths = [Path(index_dir).absolute() / INDEX_NAME] if index_dir is not None else []
    return paths + [p for p in [Path(root).absolute() / INDEX_NAME] if p not in paths]


def _list(root: str, previous: Listing | None, progress: bool) -> tuple[Listing, str]:
    return list_tree(root, previous, progress), "updated" if previous else "listed"


def current_listing(root: str, index_dir: str | Path | None = None, *, rebuild: bool = False,
                    progress: bool = False) -> tuple[Listing, str]:
    """The tree's listing and how it was had: ``"index"`` (a fresh index), ``"updated"`` (a
    stale index updated) or ``"listed"`` (listed in full); written to ``index_dir`` if given."""
    candidates = _candidates(root, index_dir)
    previous = None
    for path in candidates if not rebuild else []:
        listing = read_listing(path, root)
        if listing is not None and is_fresh(listing, root):
            return listing, "index"
        previous = previous or listing
    if index_dir is None or not os.path.isdir(root):
        # (a missing root fails in the listing, before anything is written for the index)
        return _list(root, previous, progress)
    target = candidates[0]
    with _exclusive(target) as writable:
        if not rebuild:   # another rank may have written it while this one waited for the lock
            listing = read_listing(target, root)
            if listing is not None and is_fresh(listing, root):
                return listing, "index"
            previous = listing or previous
        listing, how = _list(root, previous, progress)
        if writable:
            try:
                write_listing(listing, target)
            except OSError as err:
                log.warning("cannot write the scan index %s (%s)", target, err.strerror)
        return listing, how


def scan(root: str | Path, on_corrupt: str = "fail", index_dir: str | Path | None = None) -> Layout:
    """Train/val file lists of ``root`` (through the index when one is fresh); raises DataError
    with a one-line message for a broken layout or, with ``on_corrupt="fail"``, a corrupt file."""
    root = str(root)
    listing, _ = current_listing(root, index_dir)
    return layout_from_listing(root, listing.classes, listing.folders, on_corrupt)


def scan_val(root: str | Path, on_corrupt: str = "fail",
             index_dir: str | Path | None = None) -> tuple[list[str], Split]:
    """The val split alone and its class folders (evaluating saved weights): from a fresh index
    if there is one, else listed (the val split only; nothing is written)."""
    root = str(root)
    if on_corrupt not in ("fail", "skip"):
        raise DataError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    for path in _candidates(root, index_dir):
        listing = read_listing(path, root)
        if listing is not None and is_fresh(listing, root):
            return listing.classes, split_from_listing(
                os.path.join(root, "val"), listing.classes, listing.folders["val"], on_corrupt)
    if not os.path.isdir(root):
        raise DataError(f"data root not found: {root} (expected {root}/val/<class>/<image>)")
    split_dir = os.path.join(root, "val")
    classes = _class_names(split_dir)
    with ThreadPoolExecutor(_THREADS) as pool:
        folders = list(pool.map(lambda name: _list_folder(os.path.join(split_dir, name), 0, None),
                                classes))
    return classes, split_from_listing(split_dir, classes, folders, on_corrupt)


# ---- the `pipeline data index / check` commands --------------------------------------------------

def index_tree(root: str, out: str | None = None, rebuild: bool = False) -> dict:
    """Bring the index in ``out`` (default: ROOT) up to date; a summary for the command line."""
    start = time.perf_counter()
    listing, how = current_listing(root, out or root, rebuild=rebuild, progress=True)
    counts = {s: sum(len(f.names) for f in listing.folders[s]) for s in SPLITS}
    corrupt = sum(int((~f.readable).sum()) for fs in listing.folders.values() for f in fs)
    return {"root": root, "index": str(Path(out or root).absolute() / INDEX_NAME), "how": how,
            "classes": len(listing.classes), **counts, "corrupt_at_scan": corrupt,
            "seconds": round(time.perf_counter() - start, 2)}


def check_tree(root: str, workers: int | None = None, shown: int = 100) -> dict:
    """Decode every file of ``root`` (``layout.verify_file``) on ``workers`` threads (PIL
    releases the GIL while decoding) with a progress bar; a summary naming the corrupt files."""
    start = time.perf_counter()
    listing, _ = current_listing(root)
    paths = [os.path.join(root, split, name, f) for split in SPLITS
             for name, folder in zip(listing.classes, listing.folders[split]) for f in folder.names]
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    corrupt = []
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool, \
            tqdm(total=len(paths), desc="decoding", unit="file", disable=None) as bar:
        for chunk, reasons in zip(chunks, pool.map(lambda c: [verify_file(p) for p in c], chunks)):
            corrupt += [(p, r) for p, r in zip(chunk, reasons) if r is not None]
            bar.update(len(chunk))
    return {"root": root, "files": len(paths), "corrupt": len(corrupt),
            "corrupt_files": [{"path": p, "reason": r} for p, r in corrupt[:shown]],
            "seconds": round(time.perf_counter() - start, 2)}
