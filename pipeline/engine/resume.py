"""What a run resumes from, and whether it may: decided before anything is built.

Every checkpoint records the resolved config it was trained with and the world size that wrote
it (rank 0's manifest, see ``checkpoint.py``). A run chooses the newest whole checkpoint of its
index (a damaged newer one is skipped with a warning naming it) and compares configs:

- identical: resume;
- only keys that do not change what is trained (how often the run logs, evaluates and
  checkpoints, how it reads data, where it reports: ``FREE``) or a budget that grows (``GROW``,
  the one way a finished run is re-opened): resume; the changes are logged and recorded in
  MLflow (``record``);
- any other key: refused with one line listing the keys, unless ``checkpoint.allow_changes``
  names them (a key or a section: ``optim``);
- another world size: refused, always. The global batch, the learning rate scaled from it, the
  steps an epoch has (which the step counter and the schedule count in), each rank's share of
  the epoch's sample order and ZeRO's optimizer partitions all depend on it.

An explicit ``checkpoint.resume=<tag dir>`` may also change ``name`` / ``output_dir``: a new
run started from another run's checkpoint, which gets its own MLflow run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import Config, ConfigError, flatten
from pipeline.tracking import Tracker

from . import checkpoint as ckpt

FREE = ("engine.log_every", "engine.sync_every", "engine.eval_every",
        "engine.eval_every_iterations", "data.workers", "data.prefetch", "data.pin_memory",
        "data.val_batch_size", "checkpoint", "tracking")
GROW = ("schedule.epochs", "schedule.iterations")
FORK = ("name", "output_dir")
log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path
    tag: str
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (saved, now)
    new_keys: frozenset[str] = frozenset()  # changed keys the saved config did not have
    rejected: list[tuple[str, str]] = field(default_factory=list)  # newer damaged tags
    fork: bool = False  # another run's checkpoint: continue in a new MLflow run

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flat_saved(saved: dict) -> dict[str, Any]:
    """The saved config over the current schema's defaults (a key added to the schema since
    counts as its default), flattened like ``flatten``."""
    try:
        return flatten(OmegaConf.merge(OmegaConf.structured(Config), saved))
    except OmegaConfBaseException:  # a key the schema no longer has
        return flatten(OmegaConf.create(saved))


def config_changes(saved: dict, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key of ``cfg`` that differs."""
    before = _flat_saved(saved)
    return {k: (before.get(k), v) for k, v in flatten(cfg).items() if before.get(k) != v}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    def show(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in changes.items())


def _may_change(key: str, before: Any, now: Any, allowed: list[str], explicit: bool) -> bool:
    if _under(key, FREE) or _under(key, allowed):
        return True
    if key in GROW and isinstance(before, int) and isinstance(now, int):
        return now >= before and (key != "schedule.iterations" or before > 0)
    return explicit and key in FORK


def _choose(directory: Path, tags: list[str], explicit: bool, main: bool) -> tuple[str, list]:
    tag, rejected = ckpt.newest_good(directory, tags)
    if explicit and tag is None:
        raise ConfigError(f"config key 'checkpoint.resume': {directory / tags[0]} is not a "
                          f"whole checkpoint ({rejected[0][1]})")
    for bad, problem in rejected if main else ():
        log.warning("checkpoint %s is damaged (%s): skipped", directory / bad, problem)
    if tag is None:
        raise ConfigError(f"no whole checkpoint in {directory}: "
                          f"{ckpt.describe_damage(rejected)}: start a new run with another name=")
    return tag, rejected


def plan(cfg: DictConfig, ckpt_dir: Path, world_size: int, main: bool = True
         ) -> ResumePoint | None:
    """The checkpoint this run resumes from (None: it starts afresh), checked against its
    config and world size; ConfigError (one line) when it may not resume from it. Every rank
    decides alike (from the same files); ``main`` (rank 0) logs what it skipped."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        if ckpt.read_index(ckpt_dir):
            raise ConfigError(f"{ckpt_dir} holds checkpoints of an earlier run: resume it "
                              "(checkpoint.resume=auto) or set another name= / checkpoint.dir=")
        return None
    explicit = mode != "auto"
    directory, tags = (Path(mode).parent, [Path(mode).name]) if explicit else \
        (ckpt_dir, ckpt.read_index(ckpt_dir))
    if not tags:
        return None
    tag, rejected = _choose(directory, tags, explicit, main)
    manifest = ckpt.manifest(directory / tag)
    if manifest["world_size"] != world_size:
        raise ConfigError(f"checkpoint {directory / tag} was written by {manifest['world_size']}"
                          f" ranks, this run has {world_size}: a run resumes only at the world "
                          f"size that wrote its checkpoint; run it on {manifest['world_size']} "
                          "ranks, or start a new run (another name=)")
    saved = manifest["state"]["config"]
    changes = config_changes(saved, cfg)
    allowed = list(cfg.checkpoint.allow_changes)
    refused = {k: v for k, v in changes.items() if not _may_change(k, *v, allowed, explicit)}
    if refused:
        raise ConfigError(f"checkpoint {directory / tag} was trained with another config: "
                          f"{describe(refused)}; resume it with the config it was trained with, "
                          "start a new run (checkpoint.resume=none with another name=), or "
                          f"accept the changes: checkpoint.allow_changes=[{','.join(refused)}]")
    saved_keys = flatten(OmegaConf.create(saved))
    return ResumePoint(directory, tag, changes, frozenset(changes.keys() - saved_keys.keys()),
                       rejected, fork=explicit and any(k in changes for k in FORK))


def record(point: ResumePoint, tracker: Tracker, run_dir: Path, step: int) -> None:
    """Tell MLflow what the resume at ``step`` changed or skipped. MLflow params are write-once:
    they keep the values the run started with, except keys it never had; the changes go to the
    tag ``config_changes`` and to ``run_dir/config_changes.json`` (one entry per resume that
    changed something), logged as an artifact with the current ``config.yaml``."""
    tags = {}
    if point.rejected:
        tags["damaged_checkpoints"] = ckpt.describe_damage(point.rejected)
    if point.fork:
        tags["resumed_from"] = str(point.path.resolve())
    if point.changes:
        history = run_dir / "config_changes.json"
        entries = json.loads(history.read_text()) if history.is_file() else []
        entries.append({"step": step, "checkpoint": str(point.path),
                        "changes": {k: list(v) for k, v in point.changes.items()}})
        history.write_text(json.dumps(entries, indent=1) + "\n")
        tags["config_changes"] = describe(point.changes)
        tracker.log_params({k: point.changes[k][1] for k in point.new_keys})
        tracker.log_artifact(history)
        tracker.log_artifact(run_dir / "config.yaml")
    if tags:
        tracker.set_tags(tags)
