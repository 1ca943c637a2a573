"""Resume checks what it resumes (issue 16, item 3; item 6 for a finished run): a checkpoint
records the config and world size it was trained with; a resume changes only what cannot change
the training (or grows the budget), anything else is one line naming the keys and the way out;
a finished run is reported again, re-opened only by an extension."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import Pipeline
from engine_runs import (BASELINE, RUN, TINY, FakeEngine, HeldRun, index_tags, metric_history,
                         mlflow_runs, one_line_error, train_args)
from pipeline.config import ConfigError, load_config
from pipeline.engine import checkpoint as ckpt
from pipeline.engine import resume


# ----------------------------------------------------------------------------- the rules
def saved_checkpoint(ckpt_dir: Path, *overrides: str) -> str:
    """A checkpoint of the config BASELINE + TINY + ``overrides``, as a world of one saves it."""
    cfg = load_config(BASELINE, [*TINY, *overrides])
    tag = ckpt.tag_name(1, 3)
    state = {"epoch": 1, "step_in_epoch": 1, "run_id": "r",
             "config": OmegaConf.to_container(cfg, resolve=True)}
    ckpt.save(FakeEngine(), ckpt_dir, tag, state, rank=0, world_size=1, keep=2, after=None)
    return tag


def plan(ckpt_dir: Path, *overrides: str, world_size: int = 1) -> resume.ResumePoint | None:
    return resume.plan(load_config(BASELINE, [*TINY, *overrides]), ckpt_dir, world_size)


@pytest.mark.unit
def test_what_a_resume_may_change(tmp_path):
    tag = saved_checkpoint(tmp_path)
    assert plan(tmp_path).changes == {}
    point = plan(tmp_path, "schedule.epochs=5", "engine.log_every=7", "data.workers=1",
                 "checkpoint.keep_last=4", "tracking.experiment=other")
    assert point.tag == tag and not point.fork
    assert point.changes == {"schedule.epochs": (2, 5), "engine.log_every": (1, 7),
                             "data.workers": (2, 1), "checkpoint.keep_last": (2, 4),
                             "tracking.experiment": ("digits", "other")}
    for refused in ["schedule.epochs=1", "optim.lr=0.2", "data.batch_size=32",
                    "model.name=cifar_resnet20", "engine.max_steps_per_epoch=3",
                    "schedule.iterations=100"]:
        key = refused.split("=")[0]
        with pytest.raises(ConfigError, match=rf"allow_changes=\[{key}\]$"):
            plan(tmp_path, refused)
    accepted = plan(tmp_path, "optim.lr=0.2", "optim.momentum=0.8",
                    "checkpoint.allow_changes=[optim]")  # a section allows all its keys
    assert accepted.changes.keys() == {"optim.lr", "optim.momentum", "checkpoint.allow_changes"}
    opts = plan(tmp_path, "method.name=gated", "model.opts.gate_hidden=8",
                "checkpoint.allow_changes=[method.name,model.opts]")
    assert opts.new_keys == {"model.opts.gate_hidden"}  # never an MLflow param: may be logged


@pytest.mark.unit
def test_another_world_size_is_refused_and_a_fork_is_a_new_run(tmp_path):
    tag = saved_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="written by 1 ranks, this run has 2"):
        plan(tmp_path, world_size=2)
    with pytest.raises(ConfigError, match=r"name \"digits-baseline\" -> \"fork\""):
        plan(tmp_path, "name=fork")  # the same checkpoint folder under another name
    fork = plan(tmp_path / "elsewhere", "name=fork", f"checkpoint.resume={tmp_path / tag}")
    assert fork.fork and fork.path == tmp_path / tag and fork.changes["name"][1] == "fork"


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def stopped(tmp_path_factory, digits_root) -> Path:
    """The working directory of a run stopped after step 3 of 4."""
    cwd = tmp_path_factory.mktemp("stopped")
    run = HeldRun(Pipeline(cwd), train_args(digits_root), hold_at=3)
    run.wait_held()
    run.request_stop()
    assert run.wait() == 75, run.stderr()[-3000:]
    return cwd


REFUSED = {"optim.lr=0.2": "optim.lr 0.1 -> 0.2",
           "data.batch_size=32": "data.batch_size 16 -> 32",
           "model.name=cifar_resnet20": 'model.name "cifar_resnet8" -> "cifar_resnet20"',
           "schedule.epochs=1": "schedule.epochs 2 -> 1"}


@pytest.mark.e2e
def test_a_changed_config_is_refused_naming_the_keys_and_the_way_out(stopped, digits_root):
    ckpt_dir = stopped / "runs" / RUN / "checkpoints"
    tags = index_tags(ckpt_dir)
    for override, change in REFUSED.items():
        out = Pipeline(stopped).run(*train_args(digits_root, override))
        key = override.split("=")[0]
        one_line_error(out, f"checkpoint runs/{RUN}/checkpoints/{tags[-1]} was trained with "
                       f"another config: {change};", "another name=",
                       f"checkpoint.allow_changes=[{key}]")
    [run] = mlflow_runs(stopped)
    assert run.info.status == "KILLED" and index_tags(ckpt_dir) == tags  # nothing touched


@pytest.mark.e2e
def test_another_world_size_is_refused(stopped, digits_root):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2")
    proc = Pipeline(stopped).popen(*train_args(digits_root), launcher=launcher)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "was written by 1 ranks, this run has 2: a run resumes only at the world size " \
           "that wrote its checkpoint" in stderr, stderr[-3000:]
    [run] = mlflow_runs(stopped)
    assert run.info.status == "KILLED"


def copy_run(stopped: Path, to: Path) -> Path:
    shutil.copytree(stopped, to)
    return to


@pytest.mark.e2e
def test_an_allowed_model_change_that_does_not_fit_is_one_line(stopped, tmp_path, digits_root):
    cwd = copy_run(stopped, tmp_path / "run")
    out = Pipeline(cwd).run(*train_args(digits_root, "model.name=cifar_resnet20",
                                        "checkpoint.allow_changes=[model.name]"))
    one_line_error(out, "does not fit this model (Missing key(s) in state_dict: ")
    [run] = mlflow_runs(cwd)
    assert run.info.status == "KILLED"


@pytest.mark.e2e
def test_a_finished_run_is_reported_not_reopened_unless_extended(stopped, tmp_path, digits_root):
    cwd = copy_run(stopped, tmp_path / "run")
    cli = Pipeline(cwd)
    out = cli.run(*train_args(digits_root))
    assert out.returncode == 0, out.stderr[-3000:]
    record = cli.final(out.stdout)
    [run] = mlflow_runs(cwd)
    assert run.info.status == "FINISHED"
    ended = run.info.end_time

    again = cli.run(*train_args(digits_root))  # the same command: reported, not re-opened
    assert again.returncode == 0 and cli.final(again.stdout) == record
    assert "already finished" in again.stderr
    changed = cli.run(*train_args(digits_root, "optim.lr=0.2"))  # a refused resume
    one_line_error(changed, "optim.lr 0.1 -> 0.2")
    [run] = mlflow_runs(cwd)
    assert (run.info.status, run.info.end_time) == ("FINISHED", ended)

    extended = cli.run(*train_args(digits_root, "schedule.epochs=3", "engine.log_every=2",
                                   "data.workers=1"))
    assert extended.returncode == 0, extended.stderr[-3000:]
    final = cli.final(extended.stdout)
    assert final["epochs"] == 3 and final["run_id"] == record["run_id"]
    [run] = mlflow_runs(cwd)
    assert run.info.status == "FINISHED" and run.info.end_time > ended
    for change in ["schedule.epochs 2 -> 3", "engine.log_every 1 -> 2", "data.workers 2 -> 1"]:
        assert change in run.data.tags["config_changes"]
    assert run.data.params["schedule.epochs"] == "2"  # MLflow params are write-once
    assert sorted(metric_history(cwd, run.info.run_id, "val/top1")) == [2, 4, 6]
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    config = yaml.safe_load(Path(client.download_artifacts(
        run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["schedule"]["epochs"] == 3
    assert "config_changes.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
