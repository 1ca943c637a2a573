"""Stopping and the truth about it (issue 16, items 5, 6, 7 and 9): Ctrl-C is a graceful stop
and a second one aborts; the stop file is honoured once; MLflow ends a run FINISHED, FAILED
with its error, or KILLED with the reason; a run stopped and resumed logs the per-step losses
of one that ran through, with either data backend."""
from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import Pipeline
from engine_runs import (RUN, HeldRun, index_tags, metric_history, mlflow_runs, one_line_error,
                         train_args)


# ----------------------------------------------------------------------------- item 5: Ctrl-C
@pytest.mark.e2e
def test_ctrl_c_checkpoints_and_exits_resumable(pipeline_cli, digits_root):
    run = HeldRun(pipeline_cli, train_args(digits_root), hold_at=3)
    run.wait_held()
    run.interrupt()
    assert run.wait() == 75, run.stderr()[-3000:]
    assert "Traceback" not in run.stderr()
    ckpt_dir = pipeline_cli.cwd / "runs" / RUN / "checkpoints"
    assert index_tags(ckpt_dir)[-1] == "epoch0001-step000000003"  # the step it stopped at
    [mlflow_run] = mlflow_runs(pipeline_cli.cwd)
    assert mlflow_run.info.status == "KILLED"
    assert mlflow_run.data.tags["stop_reason"] == "signal"


# Two Ctrl-C in a row, each delivered before the next line runs (a signal a process sends
# itself is handled before os.kill returns to Python code): no race with a clock.
TWO_CTRL_C = """\
import os, signal
from pipeline.engine.stopping import StopRequest

stop = StopRequest()
os.kill(os.getpid(), signal.SIGINT)
print("after the first:", stop.requested(), stop.reason, flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("after the second: still running", flush=True)
"""


@pytest.mark.unit
def test_a_second_ctrl_c_aborts_at_once():
    out = subprocess.run([sys.executable, "-c", TWO_CTRL_C], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.splitlines() == ["after the first: True signal"], out.stderr[-3000:]
    assert out.returncode == -signal.SIGINT and "KeyboardInterrupt" in out.stderr


# ----------------------------------------------------------------------------- item 6: status
@pytest.mark.e2e
def test_a_failed_start_leaves_no_running_mlflow_run_and_no_files(pipeline_cli, digits_root):
    not_a_folder = pipeline_cli.cwd / "not-a-folder"
    not_a_folder.write_text("")
    out = pipeline_cli.run(*train_args(digits_root, f"output_dir={not_a_folder}"))
    one_line_error(out, str(not_a_folder))
    assert [r.info.status for r in mlflow_runs(pipeline_cli.cwd)
            if r.info.status == "RUNNING"] == []
    out = pipeline_cli.run(*train_args(pipeline_cli.cwd / "no-data"))
    one_line_error(out, str(pipeline_cli.cwd / "no-data"))
    assert not (pipeline_cli.cwd / "runs").exists()


@pytest.mark.e2e
def test_a_failure_during_training_ends_failed_with_the_error(pipeline_cli, digits_root):
    run = HeldRun(pipeline_cli, train_args(digits_root), hold_at=1)
    run.wait_held()
    # the checkpoint folder (not written before the epoch ends) turns out to be a file
    (pipeline_cli.cwd / "runs" / RUN / "checkpoints").write_text("")
    run.request_stop()
    # not bad input but a failure of the run (as a full disk would be): exit 1, the traceback
    assert run.wait() == 1, run.stderr()[-3000:]
    assert "Traceback" in run.stderr() and "FileExistsError" in run.stderr()
    [mlflow_run] = mlflow_runs(pipeline_cli.cwd)
    assert mlflow_run.info.status == "FAILED"
    assert f"runs/{RUN}/checkpoints" in mlflow_run.data.tags["error"]


# ------------------------------------------------- items 6, 7, 9: stop file, stop and resume
STEPS = ["engine.max_steps_per_epoch=3"]  # 6 steps; stopped after step 2, mid-epoch 0
STOP_REASON = {"dali": "preempted", "torchvision": ""}  # what the stop file says, if anything


def interrupted_run(cli: Pipeline, args: list[str], reason: str) -> SimpleNamespace:
    """Stop a run with its stop file after step 2, then run the same command again."""
    run = HeldRun(cli, args, hold_at=2)
    run.wait_held()
    run.request_stop(reason)
    code = run.wait()
    [stopped] = mlflow_runs(cli.cwd)
    left = run.stop_file.exists()
    again = cli.run(*args, PIPELINE_STOP_FILE=str(run.stop_file))  # the same environment
    return SimpleNamespace(cwd=cli.cwd, code=code, stderr=run.stderr(), stopped=stopped,
                           stop_file_left=left, again=again)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root):
    """``runs(kind, backend)``: the interrupted run or its uninterrupted reference, made once."""
    made = {}

    def get(kind: str, backend: str) -> SimpleNamespace:
        if (kind, backend) not in made:
            cli = Pipeline(tmp_path_factory.mktemp(f"{kind}-{backend}"))
            args = train_args(digits_root, f"data.backend={backend}", *STEPS)
            if kind == "interrupted":
                made[kind, backend] = interrupted_run(cli, args, STOP_REASON[backend])
            else:
                made[kind, backend] = SimpleNamespace(cwd=cli.cwd, again=cli.run(*args))
        return made[kind, backend]

    return get


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_the_stop_file_is_honoured_once_and_the_run_resumes(runs, backend):
    run = runs("interrupted", backend)
    assert run.code == 75, run.stderr[-3000:]
    assert not run.stop_file_left
    assert run.stopped.info.status == "KILLED"
    assert run.stopped.data.tags["stop_reason"] == (STOP_REASON[backend] or "stop_file")
    assert run.again.returncode == 0, run.again.stderr[-3000:]
    assert "resumed from" in run.again.stderr
    [finished] = mlflow_runs(run.cwd)
    assert finished.info.run_id == run.stopped.info.run_id
    assert finished.info.status == "FINISHED" and "stop_reason" not in finished.data.tags


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one(runs, backend):
    resumed, through = runs("interrupted", backend), runs("reference", backend)
    assert resumed.again.returncode == 0 and through.again.returncode == 0
    [a], [b] = mlflow_runs(resumed.cwd), mlflow_runs(through.cwd)
    losses = metric_history(resumed.cwd, a.info.run_id, "train/loss")
    expected = metric_history(through.cwd, b.info.run_id, "train/loss")
    assert sorted(expected) == list(range(1, 7)) and sorted(losses) == sorted(expected)
    differing = [(step, losses[step], expected[step]) for step in sorted(expected)
                 if losses[step] != expected[step]]
    assert not differing, f"(step, resumed, uninterrupted) where they differ: {differing}"
