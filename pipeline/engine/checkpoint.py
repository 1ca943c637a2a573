"""Atomic, resumable DeepSpeed checkpoints.

Every rank writes its part of a tag directory with ``engine.save_checkpoint``; only when all
ranks are done does rank 0 record the tag in ``index.json`` (written to a temporary file and
renamed), so a run killed while saving leaves the previous checkpoint as the latest. Tags that
fall out of the last ``keep`` are deleted after the index no longer names them. Each rank also
stores its RNG states beside the DeepSpeed files, so a resumed run draws the same numbers.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier

INDEX = "index.json"


def read_index(ckpt_dir: Path) -> list[str]:
    path = ckpt_dir / INDEX
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["tags"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: unreadable checkpoint index ({err})") from None


def _write_index(ckpt_dir: Path, tags: list[str]) -> None:
    tmp = ckpt_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps({"tags": tags}))
    os.replace(tmp, ckpt_dir / INDEX)


def latest_tag(ckpt_dir: Path) -> str | None:
    tags = read_index(ckpt_dir)
    return tags[-1] if tags else None


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


def save(engine, ckpt_dir: Path, tag: str, client_state: dict, rank: int, keep: int) -> None:
    """Write checkpoint ``tag`` on every rank, then publish it atomically (rank 0)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        tags = [t for t in read_index(ckpt_dir) if t != tag] + [tag]
        kept = tags[-keep:]
        _write_index(ckpt_dir, kept)
        for stale in ckpt_dir.iterdir():
            if stale.is_dir() and stale.name not in kept:
                shutil.rmtree(stale, ignore_errors=True)
    barrier()


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; return the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng.is_file():  # absent when the world size changed: keep fresh RNG streams
        _set_rng_state(torch.load(rng, weights_only=False))
    return client_state


def load_module_state(path: Path) -> dict:
    """Model weights from a final checkpoint file or a DeepSpeed tag / checkpoint directory."""
    if path.is_dir():
        tag_dir = path / latest_tag(path) if (path / INDEX).is_file() else path
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"{path}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        return torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["model"] if isinstance(state, dict) and "model" in state else state
