"""End to end through the real stack: digits JPEGs → DALI / torchvision → DeepSpeed → MLflow.

Every run happens in its own scratch directory (its own MLflow store) through the `pipeline`
command, as a user would run it.
"""
from __future__ import annotations

import json
import signal
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import config_path

BASELINE = config_path("digits/baseline.yaml")
# A short schedule that still learns digits well: about a minute on 2 cores.
FAST = ["model.name=cifar_resnet8", "schedule.epochs=6", "data.batch_size=32",
        "optim.lr=0.05", "checkpoint.every_minutes=0"]


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
    args = ["train", BASELINE, f"data.root={digits_root}", "model.name=cifar_resnet8",
            "schedule.epochs=3", "data.batch_size=16", "engine.log_every=2",
            "checkpoint.every_minutes=0.01"]  # a checkpoint after (almost) every step
    proc = pipeline_cli.popen(*args)
    ckpt_index = pipeline_cli.cwd / "runs" / "digits-baseline" / "checkpoints" / "index.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until mid-epoch 2: several checkpoints exist
        if ckpt_index.is_file() and "epoch0001" in ckpt_index.read_text():
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # no warning: the last steps are replayed on resume
    proc.communicate()
    tags = json.loads(ckpt_index.read_text())["tags"]
    assert len(tags) == 2 and any("epoch0001" in t for t in tags)

    out = pipeline_cli.run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    final = pipeline_cli.final(out.stdout)
    assert final["epochs"] == 3 and "resumed from" in out.stderr
    runs = MlflowClient(pipeline_cli.tracking_uri()).search_runs(
        [MlflowClient(pipeline_cli.tracking_uri()).get_experiment_by_name("digits").experiment_id])
    assert [r.info.run_id for r in runs] == [final["run_id"]]
    for key, steps in metric_steps(pipeline_cli.tracking_uri(), final["run_id"]).items():
        assert len(steps) == len(set(steps)), f"{key} logged a step twice: {steps}"
    assert len(metric_steps(pipeline_cli.tracking_uri(), final["run_id"])["val/top1"]) == 3


def test_sigterm_checkpoints_and_exits_resumable(pipeline_cli, digits_root):
    args = ["train", BASELINE, f"data.root={digits_root}", "model.name=cifar_resnet8",
            "schedule.epochs=3", "data.batch_size=16",
            "checkpoint.every_minutes=0.01"]  # a checkpoint after (almost) every step
    proc = pipeline_cli.popen(*args)
    ckpt_dir = pipeline_cli.cwd / "runs" / "digits-baseline" / "checkpoints"
    deadline = time.monotonic() + 300
    # signal once training is under way: a wall-clock wait races an epoch on an idle machine
    while not (ckpt_dir / "index.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    latest = json.loads((ckpt_dir / "index.json").read_text())["tags"][-1]
    state = torch.load(ckpt_dir / latest / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["epoch"] < 3 and state["step_in_epoch"] > 0, latest   # stopped mid-epoch
    out = pipeline_cli.run(*args)
    assert out.returncode == 0 and pipeline_cli.final(out.stdout)["epochs"] == 3
    assert "resumed from" in out.stderr


def _one_line_error(out, *fragments):
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 or "error:" in lines[-1], out.stderr
    last = lines[-1]
    for fragment in fragments:
        assert fragment in last, last


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
