"""Atomic, verified, resumable DeepSpeed checkpoints.

Every rank writes its part of a tag directory with ``engine.save_checkpoint``, its RNG states
beside it (so a resumed run draws the same numbers) and a manifest of the files it wrote, with
their sizes and SHA-256 (``manifest_rank<r>.json``; rank 0's also holds the world size and the
client state: position, MLflow run id, resolved config). Only when all ranks are done does rank
0 record the tag in ``index.json`` (written to a temporary file and renamed), so a run killed
while saving leaves the previous checkpoint as the latest.

A tag is verified against its manifests before it is used (every rank's manifest there, every
file it lists present, of its size, with its checksum): ``newest_good`` walks the index from the
newest tag and returns the first whole one, with what is wrong with each newer one.

Pruning deletes only what the run created: tag directories this run's index listed that fall
out of the last ``keep``. Never another file or folder of the checkpoint directory
(``checkpoint.dir`` may be a shared folder), nothing not named like a tag, nothing through a
symbolic link.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError

from .distributed import barrier

INDEX = "index.json"
MANIFEST = "manifest_rank{}.json"
TAG = re.compile(r"epoch\d{4,}-step\d{9,}")  # the names tag_name gives, the only ones pruned


def tag_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:04d}-step{step:09d}"


def read_index(ckpt_dir: Path) -> list[str]:
    """The published tags of ``ckpt_dir``, oldest first."""
    path = ckpt_dir / INDEX
    if not path.is_file():
        return []
    try:
        tags = json.loads(path.read_text())["tags"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable checkpoint index ({err})") from None
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ValueError(f"{path}: unreadable checkpoint index (tags is not a list of names)")
    return tags


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _deepspeed_files(engine, ckpt_dir: Path, tag: str) -> list[Path]:
    """The files ``engine.save_checkpoint`` wrote on this rank, by DeepSpeed's own naming: the
    model states (data-parallel rank 0) and, under ZeRO, this rank's optimizer partition."""
    names = []
    if engine.save_non_zero_checkpoint:
        names.append(engine._get_ckpt_name(str(ckpt_dir), tag))
    if engine.save_zero_checkpoint:
        names.append(engine._get_zero_ckpt_name(str(ckpt_dir), tag))
    return [Path(name) for name in names]


def _write_manifest(tag_dir: Path, rank: int, world_size: int, files: list[Path],
                    state: dict | None) -> None:
    manifest = {"rank": rank, "world_size": world_size,
                "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                          for f in files}}
    if state is not None:
        manifest["state"] = state
    _write_atomic(tag_dir / MANIFEST.format(rank), json.dumps(manifest))


def save(engine, ckpt_dir: Path, tag: str, state: dict, rank: int, world_size: int, keep: int,
         after: str | None) -> None:
    """Write checkpoint ``tag`` on every rank (``state``: the client state, JSON-serialisable),
    then publish it (rank 0): the index becomes its tags up to ``after`` (the tag this run
    continues from: any newer ones belonged to a discarded future), then ``tag``, cut to the
    last ``keep``; the tags that fall out are deleted."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    torch.save(_rng_state(), rng)
    _write_manifest(ckpt_dir / tag, rank, world_size,
                    [*_deepspeed_files(engine, ckpt_dir, tag), rng], state if rank == 0 else None)
    barrier()
    if rank == 0:
        _publish(ckpt_dir, tag, keep, after)
    barrier()


def _publish(ckpt_dir: Path, tag: str, keep: int, after: str | None) -> None:
    listed = read_index(ckpt_dir)
    base = listed[:listed.index(after) + 1] if after in listed else listed
    kept = [t for t in base if t != tag] + [tag]
    kept = kept[-keep:]
    _write_atomic(ckpt_dir / INDEX, json.dumps({"tags": kept}))
    for stale in listed:
        if stale not in kept:
            _remove_tag(ckpt_dir, stale)


def _remove_tag(ckpt_dir: Path, tag: str) -> None:
    path = ckpt_dir / tag
    if TAG.fullmatch(tag) and not path.is_symlink() and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # rmtree removes links inside, never follows


class _Damaged(Exception):
    """What is wrong with a checkpoint, in a few words."""


def _manifest(tag_dir: Path, rank: int) -> dict:
    path = tag_dir / MANIFEST.format(rank)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise _Damaged(f"{path.name} missing") from None
    except (OSError, ValueError):
        raise _Damaged(f"{path.name} unreadable") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("world_size"), int)):
        raise _Damaged(f"{path.name} malformed")
    return manifest


def _check(tag_dir: Path) -> None:
    if not tag_dir.is_dir():
        raise _Damaged("missing")
    if not any(tag_dir.iterdir()):
        raise _Damaged("empty folder")
    first = _manifest(tag_dir, 0)
    state = first.get("state")
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        raise _Damaged(f"{MANIFEST.format(0)} malformed")
    manifests = [first] + [_manifest(tag_dir, r) for r in range(1, first["world_size"])]
    files = [(name, entry) for m in manifests for name, entry in m["files"].items()]
    try:
        for name, entry in files:  # sizes first: a missing or truncated file costs no reading
            path = tag_dir / name
            if not path.is_file():
                raise _Damaged(f"{name} missing")
            if path.stat().st_size != entry["bytes"]:
                raise _Damaged(f"{name} is {path.stat().st_size} bytes, {entry['bytes']} were "
                               "written")
        for name, entry in files:
            if _sha256(tag_dir / name) != entry["sha256"]:
                raise _Damaged(f"{name} does not match its checksum")
    except (KeyError, TypeError):
        raise _Damaged("a manifest is malformed") from None


def verify(tag_dir: Path) -> str | None:
    """What is wrong with checkpoint ``tag_dir``, in a few words; None when it is whole."""
    try:
        _check(tag_dir)
    except _Damaged as err:
        return str(err)
    return None


def newest_good(ckpt_dir: Path, tags: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest whole checkpoint of ``tags`` (oldest first), or None; and (tag, problem) for
    each newer one, newest first."""
    rejected = []
    for tag in reversed(tags):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return tag, rejected
        rejected.append((tag, problem))
    return None, rejected


def describe_damage(rejected: list[tuple[str, str]]) -> str:
    """``newest_good``'s rejected tags as one line: ``tag (problem); …``."""
    return "; ".join(f"{tag} ({problem})" for tag, problem in rejected)


def manifest(tag_dir: Path) -> dict:
    """Rank 0's manifest of a verified tag: ``world_size``, ``files``, ``state``."""
    return _manifest(tag_dir, 0)


def _first_detail(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__
    return detail if len(detail) <= 300 else detail[:297] + "..."


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the client state. A
    checkpoint whose weights or optimizer groups do not fit this run is a ConfigError naming
    it (the model or method changed)."""
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except RuntimeError as err:
        if "loading state_dict" not in str(err):
            raise
        raise ConfigError(f"checkpoint {ckpt_dir / tag} does not fit this model "
                          f"({_first_detail(err)}): start a new run (another name=)") from None
    except ValueError as err:  # torch's optimizer load_state_dict: groups that do not match
        raise ConfigError(f"checkpoint {ckpt_dir / tag} does not fit this run "
                          f"({_first_detail(err)}): start a new run (another name=)") from None
    if path is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    _set_rng_state(torch.load(rng, weights_only=False))
    return client_state


def load_module_state(path: Path) -> dict:
    """Model weights from a final checkpoint file, a DeepSpeed tag directory, or a checkpoint
    directory (its newest whole tag)."""
    if path.is_dir():
        tag_dir = path
        if (path / INDEX).is_file():
            tag, rejected = newest_good(path, read_index(path))
            if tag is None:
                raise ConfigError(f"{path}: no whole checkpoint: {describe_damage(rejected)}")
            tag_dir = path / tag
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"{path}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        return torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["model"] if isinstance(state, dict) and "model" in state else state
