"""One run per run directory: an exclusive lock held for the whole run.

Two ``pipeline train`` of one config at once would write the same checkpoints, ``final.pt`` and
``config.yaml``, and each could report the accuracy of weights the other wrote. So a run holds
``run.lock`` in its run directory (and in ``checkpoint.dir`` when that lies elsewhere): an
flock(2) taken before the data scan and before any other file of the run is written, released
when the run ends, and by the kernel when the process dies, however it dies (on a shared
filesystem: NFS v4 emulates flock with its own locks, which the server drops when a lost
client's lease expires; Lustre needs the ``flock`` mount option).

The ranks of one launch (torchrun, SLURM, several nodes) share the directory: only rank 0 takes
the lock, before any process group exists; the other ranks trust their launcher. They cannot
collide with another run: a second launch's rank 0 is refused at once, and without it no other
rank of that launch gets past the process-group rendezvous (its launcher then ends them).

The file names its holder (host, pid, start, SLURM job) so that a refused run can say who holds
it, and is removed by a clean release: a file still naming a holder when its lock is free was
left by a process that died; that is reported, and the lock taken over.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pipeline.config import ConfigError

LOCK = "run.lock"
log = logging.getLogger("pipeline")


def _this_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    text = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    if holder.get("slurm_job_id"):
        text += f", SLURM job {holder['slurm_job_id']}"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _refusal(path: Path, holder: dict) -> ConfigError:
    text = _describe(holder) if holder else "holder unknown"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _alive(holder["pid"]):
        text += "; that process has ended, a child process of it still holds the lock"
    return ConfigError(f"{path.parent} is in use by another run ({text}): wait for it to end, "
                       "or set another name= (or checkpoint.dir=)")


def _open_locked(path: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock; ConfigError naming the holder
    when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _refusal(path, holder) from None
        # The last holder removes the file before it lets go: if that happened between our
        # open and our lock, we hold a file no one else will open. Open the new one.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def _hold(path: Path) -> Iterator[None]:
    created = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where the user's path needs a folder
        raise ConfigError(f"{path.parent}: a file stands where this folder must be (check "
                          "output_dir, name and checkpoint.dir)") from None
    fd = _open_locked(path)
    try:
        stale = _read_holder(fd)
        if stale:
            log.warning("%s: stale lock of a run that ended without releasing it (%s): "
                        "taken over", path, _describe(stale))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_this_holder()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: see _open_locked
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders the lock created (deepest first) if the run left them empty: a run
    that failed at its start leaves nothing behind."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:  # not empty: the run wrote something there
            return


@contextmanager
def hold_run(run_dir: Path, ckpt_dir: Path) -> Iterator[None]:
    """Hold the run directory, and the checkpoint directory when it lies outside it."""
    dirs = [run_dir]
    if not ckpt_dir.resolve().is_relative_to(run_dir.resolve()):
        dirs.append(ckpt_dir)
    with ExitStack() as stack:
        for directory in dirs:
            stack.enter_context(_hold(directory / LOCK))
        yield
