"""Checkpoints survive damage, pruning deletes only what the run wrote, and two runs cannot share
a run directory (issue 16, items 2, 4 and 8)."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Pipeline
from engine_runs import (RUN, FakeEngine, HeldRun, index_tags, mlflow_runs, one_line_error,
                         train_args)
from pipeline.config import ConfigError
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.runlock import LOCK, hold_run

STATES = "mp_rank_00_model_states.pt"


def save_tags(ckpt_dir: Path, steps: range, keep: int, after: str | None = None) -> list[str]:
    """Checkpoints at ``steps`` as a run writes them, each continuing from the one before."""
    tags = []
    for step in steps:
        tag = ckpt.tag_name(0, step)
        state = {"epoch": 0, "step_in_epoch": step, "run_id": None, "config": {}}
        ckpt.save(FakeEngine(), ckpt_dir, tag, state, rank=0, world_size=1, keep=keep,
                  after=after)
        tags.append(tag)
        after = tag
    return tags


# ----------------------------------------------------------------------------- item 4: damage
@pytest.mark.unit
def test_each_kind_of_damage_is_named_and_the_newest_whole_tag_is_used(tmp_path):
    tags = save_tags(tmp_path, range(1, 6), keep=5)
    shutil.rmtree(tmp_path / tags[4])                       # the index names a missing tag
    for f in (tmp_path / tags[3]).iterdir():                # an empty tag folder
        f.unlink()
    states = tmp_path / tags[2] / STATES                    # a truncated state file
    size = states.stat().st_size
    os.truncate(states, size // 2)
    rng = tmp_path / tags[1] / "rng_rank0.pt"               # the same size, other bytes
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng.write_bytes(bytes(data))

    tag, rejected = ckpt.newest_good(tmp_path, ckpt.read_index(tmp_path))
    assert tag == tags[0]
    assert rejected == [
        (tags[4], "missing"),
        (tags[3], "empty folder"),
        (tags[2], f"{STATES} is {size // 2} bytes, {size} were written"),
        (tags[1], "rng_rank0.pt does not match its checksum")]


@pytest.mark.unit
def test_every_rank_manifest_is_required(tmp_path):
    [tag] = save_tags(tmp_path, range(1, 2), keep=1)
    manifest = tmp_path / tag / "manifest_rank0.json"
    manifest.write_text(manifest.read_text().replace('"world_size": 1', '"world_size": 2'))
    assert ckpt.verify(tmp_path / tag) == "manifest_rank1.json missing"
    manifest.unlink()
    assert ckpt.verify(tmp_path / tag) == "manifest_rank0.json missing"


# ----------------------------------------------------------------------------- item 8: pruning
@pytest.mark.unit
def test_pruning_deletes_only_tag_folders_the_index_listed_never_through_a_link(tmp_path):
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    foreign = [shared / "other-run" / "weights.pt", shared / "notes.txt",
               shared / "epoch0000-step000000099" / STATES, outside / "keep.txt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the run's")
    (shared / "data").symlink_to(outside, target_is_directory=True)
    [first] = save_tags(shared, range(1, 2), keep=2)
    shutil.rmtree(shared / first)  # a listed tag that became a link to someone's folder
    (shared / first).symlink_to(outside, target_is_directory=True)

    tags = save_tags(shared, range(2, 5), keep=2, after=first)
    assert index_tags(shared) == tags[1:]
    assert not (shared / tags[0]).exists()           # listed, fell out of the last 2: deleted
    assert (shared / first).is_symlink()             # listed, but a link: left as it is
    assert all(path.read_text() == "not the run's" for path in foreign)


@pytest.mark.unit
def test_resuming_from_an_older_tag_discards_the_newer_ones(tmp_path):
    tags = save_tags(tmp_path, range(1, 4), keep=3)
    [again] = save_tags(tmp_path, range(2, 3), keep=3, after=tags[0])
    assert index_tags(tmp_path) == [tags[0], again]
    assert not (tmp_path / tags[2]).exists()


# ----------------------------------------------------------------------------- item 2: lock
HOLDER = """\
import os, signal, sys
from pathlib import Path
from pipeline.engine.runlock import hold_run

with hold_run(Path(sys.argv[1]), Path(sys.argv[2])):
    print("held", flush=True)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
"""


def start_holder(run_dir: Path, ckpt_dir: Path, then: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ckpt_dir), then],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.unit
def test_a_held_run_directory_is_refused_naming_its_holder(tmp_path, caplog):
    run_dir, shared = tmp_path / "runs" / "a", tmp_path / "shared"
    holder = start_holder(run_dir, shared, "wait")
    try:
        expected = re.escape(f" is in use by another run (host {socket.gethostname()}, "
                             f"pid {holder.pid},")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(run_dir))}{expected}"):
            with hold_run(run_dir, run_dir / "checkpoints"):
                pass
        with pytest.raises(ConfigError, match=f"^{re.escape(str(shared))}{expected}"):
            with hold_run(tmp_path / "runs" / "b", shared):
                pass
    finally:
        holder.stdin.close()
        holder.wait(60)
    assert not (run_dir / LOCK).exists() and not (shared / LOCK).exists()  # released
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        with hold_run(run_dir, shared):
            pass
    assert "stale" not in caplog.text
    assert not run_dir.exists() and not shared.exists()  # created by the lock, left empty


@pytest.mark.unit
def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "runs" / "a"
    holder = start_holder(run_dir, run_dir / "checkpoints", "die")
    assert holder.wait(60) == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        with hold_run(run_dir, run_dir / "checkpoints"):
            assert str(os.getpid()) in (run_dir / LOCK).read_text()
    assert "stale lock" in caplog.text and f"pid {holder.pid}," in caplog.text
    assert not (run_dir / LOCK).exists()


@pytest.mark.e2e
def test_two_runs_of_one_config_cannot_collide(pipeline_cli, digits_root):
    first = HeldRun(pipeline_cli, train_args(digits_root), hold_at=1)
    first.wait_held()
    second = pipeline_cli.run(*train_args(digits_root))
    one_line_error(second, f"runs/{RUN} is in use by another run",
                   f"host {socket.gethostname()}, pid {first.proc.pid},")
    first.request_stop()
    assert first.wait() == 75, first.stderr()[-3000:]
    assert len(mlflow_runs(pipeline_cli.cwd)) == 1  # the refused run wrote nothing
    assert not (pipeline_cli.cwd / "runs" / RUN / LOCK).exists()


# ----------------------------------------------------------------------------- end to end
SHARED = ["checkpoint.dir=shared", "checkpoint.every_iterations=1", "checkpoint.keep_last=3",
          "schedule.epochs=3"]
FOREIGN = {"other-run/weights.pt", "notes.txt", "epoch0000-step000000099/" + STATES}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, digits_root) -> Path:
    """The working directory of a run stopped after step 4 of 6, a checkpoint after every step
    (the last 3 kept) in a folder ``shared`` that also holds files that are not the run's."""
    cwd = tmp_path_factory.mktemp("stopped")
    for name in FOREIGN:
        (cwd / "shared" / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / "shared" / name).write_text("not the run's")
    run = HeldRun(Pipeline(cwd), train_args(digits_root, *SHARED), hold_at=4)
    run.wait_held()
    run.request_stop()
    assert run.wait() == 75, run.stderr()[-3000:]
    return cwd


@pytest.mark.e2e
def test_a_shared_checkpoint_folder_keeps_what_is_not_the_runs(stopped):
    shared = stopped / "shared"
    assert [tag[-4:] for tag in index_tags(shared)] == ["0002", "0003", "0004"]  # steps
    assert not list(shared.glob("*-step000000001"))  # the run's first checkpoint: pruned
    assert all((shared / name).read_text() == "not the run's" for name in FOREIGN)
    assert not (shared / LOCK).exists()


def copy_run(stopped: Path, to: Path) -> Path:
    shutil.copytree(stopped, to, symlinks=True)
    return to


@pytest.mark.e2e
def test_damaged_checkpoints_are_skipped_for_the_newest_whole_one(stopped, tmp_path, digits_root):
    cwd = copy_run(stopped, tmp_path / "run")
    shared = cwd / "shared"
    oldest, emptied, truncated = index_tags(shared)
    states = shared / truncated / STATES
    os.truncate(states, states.stat().st_size // 2)
    for f in (shared / emptied).iterdir():
        f.unlink()
    missing = ckpt.tag_name(2, 5)
    (shared / "index.json").write_text(
        f'{{"tags": ["{oldest}", "{emptied}", "{truncated}", "{missing}"]}}')

    out = Pipeline(cwd).run(*train_args(digits_root, *SHARED))
    assert out.returncode == 0, out.stderr[-3000:]
    assert Pipeline.final(out.stdout)["epochs"] == 3
    for tag, problem in [(missing, "missing"), (emptied, "empty folder"),
                         (truncated, f"{STATES} is ")]:
        assert f"checkpoint shared/{tag} is damaged ({problem}" in out.stderr, out.stderr
    assert f"resumed from shared/{oldest}" in out.stderr
    [run] = mlflow_runs(cwd)
    assert run.info.status == "FINISHED"
    assert missing in run.data.tags["damaged_checkpoints"]
    assert all((shared / name).read_text() == "not the run's" for name in FOREIGN)


@pytest.mark.e2e
def test_no_whole_checkpoint_is_one_line(stopped, tmp_path, digits_root):
    cwd = copy_run(stopped, tmp_path / "run")
    shared = cwd / "shared"
    for tag in index_tags(shared):
        (shared / tag / "manifest_rank0.json").unlink()
    out = Pipeline(cwd).run(*train_args(digits_root, *SHARED))
    line = one_line_error(out, "no whole checkpoint in shared: ", "start a new run")
    for tag in index_tags(shared):
        assert f"{tag} (manifest_rank0.json missing)" in line
