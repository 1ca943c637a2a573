"""End to end through the real stack: digits JPEGs → DALI / torchvision → DeepSpeed → MLflow.

Every run happens in its own scratch directory (its own MLflow store) through the `pipeline`
command, as a user would run it. A fault (SIGKILL, SIGTERM) hits a run held at a known step
(PIPELINE_HOLD_AT_STEP), never at a moment a clock or a checkpoint file chose.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import config_path
from engine_runs import HeldRun, index_tags, one_line_error

pytestmark = pytest.mark.e2e
BASELINE = config_path("digits/baseline.yaml")
# A short schedule that clears 90% by a wide margin for every seed and either backend: val
# top-1 0.944-0.953 over seeds 0, 1, 2 x DALI, torchvision (lr 0.05 gave 0.889 on one seed).
FAST = ["model.name=cifar_resnet8", "schedule.epochs=6", "data.batch_size=32",
        "optim.lr=0.1", "checkpoint.every_minutes=0"]
# 3 epochs of 4 steps, a checkpoint after every step: fault tests hold inside epoch 2.
SHORT = ["model.name=cifar_resnet8", "schedule.epochs=3", "engine.max_steps_per_epoch=4",
         "data.batch_size=16", "data.val_batch_size=120", "engine.log_every=1",
         "checkpoint.every_minutes=0", "checkpoint.every_iterations=1"]


def metric_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {k: [m.step for m in client.get_metric_history(run_id, k)] for k in keys}


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_trains_digits_to_90_percent(pipeline_cli, digits_root, backend):
    out = pipeline_cli.run("train", BASELINE, f"data.root={digits_root}",
                           f"data.backend={backend}", *FAST)
    assert out.returncode == 0, out.stderr[-3000:]
    final = pipeline_cli.final(out.stdout)
    assert final["val_top1"] >= 0.9 and final["epochs"] == 6
    assert Path(final["checkpoint"]).is_file()
    run = MlflowClient(pipeline_cli.tracking_uri()).get_run(final["run_id"])
    assert run.data.params["data.backend"] == backend
    assert run.data.tags["world_size"] == "1" and run.data.tags["git_commit"]
    assert run.data.metrics["val/top1"] == pytest.approx(final["val_top1"])
    run_dir = pipeline_cli.cwd / "runs" / "digits-baseline"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "exported.pt").is_file()
    artifacts = {a.path for a in MlflowClient(pipeline_cli.tracking_uri()).list_artifacts(
        final["run_id"])}
    assert {"config.yaml", "checkpoint"} <= artifacts


def test_two_process_torchrun_counts_every_val_image_once(pipeline_cli, digits_root):
    val_images = sum(1 for _ in (digits_root / "val").rglob("*.jpg"))
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2")
    proc = pipeline_cli.popen("train", BASELINE, f"data.root={digits_root}",
                              "model.name=cifar_resnet8", "schedule.epochs=1",
                              "engine.max_steps_per_epoch=4", "data.batch_size=16",
                              "data.val_batch_size=50", launcher=launcher)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    final = pipeline_cli.final(stdout)
    client = MlflowClient(pipeline_cli.tracking_uri())
    run = client.get_run(final["run_id"])
    assert run.data.tags["world_size"] == "2"
    assert run.data.metrics["val/samples"] == val_images  # 360 over 2 ranks: 4 + 4 batches


def test_killed_run_resumes_into_the_same_mlflow_run(pipeline_cli, digits_root):
    args = ["train", BASELINE, f"data.root={digits_root}", *SHORT]
    run = HeldRun(pipeline_cli, args, hold_at=6)  # step 6 logged, its checkpoint not yet written
    run.wait_held()
    os.killpg(run.proc.pid, signal.SIGKILL)  # no warning: step 6 is replayed on resume
    run.wait()
    ckpt_dir = pipeline_cli.cwd / "runs" / "digits-baseline" / "checkpoints"
    assert index_tags(ckpt_dir) == ["epoch0000-step000000004", "epoch0001-step000000005"]

    out = pipeline_cli.run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    final = pipeline_cli.final(out.stdout)
    assert final["epochs"] == 3 and "resumed from" in out.stderr
    assert "epoch0001-step000000005" in out.stderr
    client = MlflowClient(pipeline_cli.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert [r.info.run_id for r in runs] == [final["run_id"]]
    steps = metric_steps(pipeline_cli.tracking_uri(), final["run_id"])
    for key, logged in steps.items():
        assert len(logged) == len(set(logged)), f"{key} logged a step twice: {logged}"
    assert sorted(steps["train/loss"]) == list(range(1, 13))
    assert sorted(steps["val/top1"]) == [4, 8, 12]


def test_sigterm_checkpoints_and_exits_resumable(pipeline_cli, digits_root):
    args = ["train", BASELINE, f"data.root={digits_root}", *SHORT]
    run = HeldRun(pipeline_cli, args, hold_at=6)
    run.wait_held()
    run.proc.send_signal(signal.SIGTERM)  # scancel: the main process only
    assert run.wait() == 75, run.stderr()[-3000:]
    ckpt_dir = pipeline_cli.cwd / "runs" / "digits-baseline" / "checkpoints"
    latest = index_tags(ckpt_dir)[-1]
    assert latest == "epoch0001-step000000006"  # the step it stopped at, mid-epoch
    state = torch.load(ckpt_dir / latest / "mp_rank_00_model_states.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2), latest
    out = pipeline_cli.run(*args)
    assert out.returncode == 0 and pipeline_cli.final(out.stdout)["epochs"] == 3
    assert "resumed from" in out.stderr


def _one_line_error(out, *fragments):
    """The one-line error naming each fragment, and nothing before it on stderr: input is
    checked before any work starts."""
    one_line_error(out, *fragments)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unknown_config_key(pipeline_cli, digits_root):
    out = pipeline_cli.run("train", BASELINE, f"data.root={digits_root}", "optim.lrr=0.1")
    _one_line_error(out, "unknown config key 'optim.lrr'")


def test_missing_data_root(pipeline_cli, tmp_path):
    out = pipeline_cli.run("train", BASELINE, f"data.root={tmp_path / 'nowhere'}")
    _one_line_error(out, str(tmp_path / "nowhere"))


def test_empty_class_folder(pipeline_cli, digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    for image in (root / "train" / "3").iterdir():
        image.unlink()
    out = pipeline_cli.run("train", BASELINE, f"data.root={root}")
    _one_line_error(out, str(root / "train" / "3"))


def test_corrupt_jpeg(pipeline_cli, digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    bad = root / "train" / "5" / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = pipeline_cli.run("train", BASELINE, f"data.root={root}")
    _one_line_error(out, str(bad))
