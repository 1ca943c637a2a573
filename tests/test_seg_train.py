"""Segmentation end to end on the synthetic Cityscapes tree, through the `pipeline` command:
train (DALI pairs → DeepSpeed → MLflow) → eval → predictions in the official format, whose
mIoU equals Cityscapes' own evaluation script's; a stop mid-run resumes with no metric step
twice; two torchrun ranks count every val image once.
"""
from __future__ import annotations

import copy
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import config_path

pytestmark = pytest.mark.e2e
CONFIG = config_path("cityscapes/synth_deeplabv3.yaml")
VAL_IMAGES = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from pipeline.data.segmentation.synth import write_cityscapes_synth

    root = tmp_path_factory.mktemp("synth") / "cityscapes"
    write_cityscapes_synth(root, size=(128, 64), count=VAL_IMAGES * 5)
    return root


def tiny(root: Path, iterations: int = 6, *extra: str) -> list[str]:
    """A DeepLabV3 (dilated ResNet-18, a 32-wide head) on 32x64 crops: seconds per step."""
    return [f"data.root={root}", "model.opts.channels=32", "data.crop_size=[32,64]",
            "data.batch_size=2", "data.val_batch_size=2", f"schedule.iterations={iterations}",
            "engine.eval_every_iterations=3", "engine.log_every=1", "checkpoint.every_minutes=0",
            *extra]


def metric_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {k: [m.step for m in client.get_metric_history(run_id, k)] for k in keys}


def official_miou(predictions: Path, root: Path) -> float:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    truths = sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    preds = [next(predictions.glob(t.name.replace("_gtFine_labelIds.png", "*.png")))
             for t in truths]
    args = copy.copy(official.args)
    # iIoU off: its category masks use np.in1d, gone in NumPy 2.4; pixel IoUs do not need it
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, False
    result = official.evaluateImgLists([str(p) for p in preds], [str(t) for t in truths], args)
    return result["averageScoreClasses"]


def test_train_eval_predict_match_the_official_evaluation(pipeline_cli, synth):
    out = pipeline_cli.run("train", CONFIG, *tiny(synth))
    assert out.returncode == 0, out.stderr[-3000:]
    final = pipeline_cli.final(out.stdout)
    assert set(final) >= {"val_miou", "val_pixel_acc", "iterations"} and final["iterations"] == 6
    assert "val_top1" not in final and "epochs" not in final
    client = MlflowClient(pipeline_cli.tracking_uri())
    run = client.get_run(final["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["task"] == "segmentation"
    assert run.data.metrics["val/miou"] == pytest.approx(final["val_miou"])
    assert run.data.metrics["val/samples"] == VAL_IMAGES
    assert any(k.startswith("val/iou/") for k in run.data.metrics)
    assert "per_class_iou.md" in {a.path for a in client.list_artifacts(final["run_id"])}
    assert len(metric_steps(pipeline_cli.tracking_uri(), final["run_id"])["val/miou"]) == 2

    checkpoint = final["checkpoint"]
    evaluated = pipeline_cli.run("eval", checkpoint)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    ours = pipeline_cli.final_event(evaluated.stdout, "eval")["miou"]
    assert ours == pytest.approx(final["val_miou"], abs=1e-6)

    results = pipeline_cli.cwd / "results"
    predicted = pipeline_cli.run("predict", checkpoint, "--split", "val", "--out", str(results))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert pipeline_cli.final_event(predicted.stdout, "predict")["images"] == VAL_IMAGES
    assert abs(official_miou(results, synth) - ours) < 1e-6


def test_a_stop_mid_run_resumes_into_the_same_run_with_no_step_twice(pipeline_cli, synth):
    args = ["train", CONFIG, *tiny(synth, 6, "engine.sync_every=1")]
    proc = pipeline_cli.popen(*args, PIPELINE_HOLD_AT_STEP="4")
    for line in proc.stderr:  # the run holds after step 4 until it is asked to stop
        if "holding at step 4" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]

    out = pipeline_cli.run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    final = pipeline_cli.final(out.stdout)
    client = MlflowClient(pipeline_cli.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("cityscapes-synth").experiment_id])
    assert [r.info.run_id for r in runs] == [final["run_id"]]
    steps = metric_steps(pipeline_cli.tracking_uri(), final["run_id"])
    for key, logged in steps.items():
        assert len(logged) == len(set(logged)), f"{key} logged a step twice: {logged}"
    assert steps["train/loss"] == list(range(1, 7))
    assert client.get_run(final["run_id"]).info.status == "FINISHED"


def test_two_torchrun_ranks_count_every_val_image_once(pipeline_cli, synth):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2")
    proc = pipeline_cli.popen("train", CONFIG, *tiny(synth, 2, "data.val_batch_size=1"),
                              launcher=launcher)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    final = pipeline_cli.final(stdout)
    run = MlflowClient(pipeline_cli.tracking_uri()).get_run(final["run_id"])
    assert run.data.tags["world_size"] == "2"
    assert run.data.metrics["val/samples"] == VAL_IMAGES
    assert 0.0 <= final["val_miou"] <= 1.0 and np.isfinite(final["val_pixel_acc"])


@pytest.mark.parametrize("variant", ["deeplabv3_ce", "deeplabv3_csg", "deeplabv3_gated",
                                     "deeplabv3_selectconv", "pspnet"])
def test_every_synthetic_variant_trains_and_evaluates(pipeline_cli, synth, variant):
    """Each method's quick segmentation config (and PSPNet's) trains a few steps on the
    synthetic tree and ends with a segmentation final line (a gated run adds its MACs)."""
    out = pipeline_cli.run("train", config_path(f"cityscapes/synth_{variant}.yaml"),
                           *tiny(synth, 2))
    assert out.returncode == 0, out.stderr[-3000:]
    final = pipeline_cli.final(out.stdout)
    assert final["iterations"] == 2 and 0.0 <= final["val_miou"] <= 1.0
    if variant.endswith("gated"):
        assert 0 < final["dynamic_macs"] <= final["macs"]
