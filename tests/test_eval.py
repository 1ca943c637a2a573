"""`pipeline eval [CONFIG] CHECKPOINT`: the saved config by default, the val split only, every
kind of saved model (final.pt, exported.pt, a DeepSpeed tag directory, a converted
checkpoint), one line for a checkpoint that fits no model; `pipeline --version`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, config_path
from pipeline.cli.main import main
from pipeline.config import to_yaml
from pipeline.data import build_val_loader
from pipeline.engine.artifacts import load_saved
from test_export import digits_config, segmentation, write_saved  # noqa: F401 (fixture)

TORCHVISION = ("data.backend=torchvision", "data.workers=0")


@pytest.fixture(scope="module")
def final(tmp_path_factory, digits_root) -> Path:
    return write_saved(tmp_path_factory.mktemp("eval") / "ce", "ce", digits_root)


def top1(model: torch.nn.Module, root: Path) -> tuple[float, int]:
    """Top-1 and sample count of ``model`` over the val split, computed here."""
    cfg = digits_config("ce", root)
    correct = seen = 0
    with torch.no_grad():
        for images, labels in build_val_loader(cfg.data, rank=0, world_size=1):
            correct += int((model(images).argmax(1) == labels).sum())
            seen += labels.numel()
    return correct / seen, seen


def evaluated(pipeline_cli, *args: str) -> dict:
    result = pipeline_cli.run("eval", *args, *TORCHVISION)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout   # stdout holds the JSON line only
    record = json.loads(lines[0])
    assert record["event"] == "eval"
    return record


@pytest.mark.e2e
def test_eval_without_config_uses_the_saved_one(final, digits_root, pipeline_cli):
    expected, samples = top1(load_saved(final).model, digits_root)
    record = evaluated(pipeline_cli, str(final), f"data.root={digits_root}")
    assert record["samples"] == samples == 360
    assert record["top1"] == pytest.approx(expected, abs=1e-12)
    assert "method/lambda_mean" in record          # the trained form: CE's own metrics


@pytest.mark.e2e
def test_eval_reads_no_train_split(final, digits_root, tmp_path, pipeline_cli):
    root = tmp_path / "val-only"
    shutil.copytree(digits_root / "val", root / "val")
    assert not (root / "train").exists()
    expected, _ = top1(load_saved(final).model, digits_root)
    record = evaluated(pipeline_cli, str(final), f"data.root={root}")
    assert record["samples"] == 360 and record["top1"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.e2e
def test_eval_of_exported_pt_and_of_a_deepspeed_tag_directory(final, digits_root, tmp_path,
                                                               pipeline_cli):
    exported = final.with_name("exported.pt")
    expected, _ = top1(load_saved(exported).model, digits_root)
    record = evaluated(pipeline_cli, str(exported), f"data.root={digits_root}")
    assert record["top1"] == pytest.approx(expected, abs=1e-12)
    assert not any(k.startswith("method/") for k in record)   # the exported form has none

    # a DeepSpeed tag directory as the engine writes it, the run's config.yaml two folders up
    run_dir = tmp_path / "runs" / "digits-ce"
    tag_dir = run_dir / "checkpoints" / "epoch0001-step000000002"
    tag_dir.mkdir(parents=True)
    saved = torch.load(final, weights_only=True)
    torch.save({"module": saved["model"]}, tag_dir / "mp_rank_00_model_states.pt")
    (run_dir / "config.yaml").write_text(to_yaml(digits_config("ce", digits_root)))
    expected, _ = top1(load_saved(final).model, digits_root)
    record = evaluated(pipeline_cli, str(tag_dir))
    assert record["top1"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.unit
def test_a_checkpoint_that_fits_no_model_is_one_line(final, digits_root, pipeline_cli):
    result = pipeline_cli.run("eval", config_path("digits/gated.yaml"), str(final),
                              f"data.root={digits_root}", *TORCHVISION)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, result.stderr
    assert re.search(r"does not fit cifar_resnet20 \(method gated\): .*(has no|has shape|"
                     r"no counterpart)", err[0]), err[0]


@pytest.mark.e2e
def test_eval_of_a_converted_checkpoint_without_config(tmp_path, digits_root, pipeline_cli,
                                                       capsys):
    released = REPO / "tests" / "fixtures" / "csg_released" / "resnet56_csg_s12_c72.t7"
    if not released.is_file():
        pytest.skip(f"no released CSG checkpoint at {released}")
    out = tmp_path / "released" / "final.pt"
    assert main(["import", "csg", str(released), "--model", "cifar_resnet56",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    record = evaluated(pipeline_cli, str(out), f"data.root={digits_root}")
    assert record["samples"] == 360 and record["method/params"] == 160_450


@pytest.mark.e2e
def test_eval_of_a_segmentation_model_without_config(segmentation, pipeline_cli):
    final, root = segmentation
    record = evaluated(pipeline_cli, str(final), f"data.root={root}")
    from pipeline.data.segmentation.labels import cityscapes_classes

    assert record["samples"] == 4 and 0 <= record["miou"] <= 1, record
    ious = [k[len("iou/"):] for k in record if k.startswith("iou/")]
    assert ious and set(ious) <= set(cityscapes_classes())   # the val split's label table


@pytest.mark.unit
def test_version_prints_the_version_and_commit():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert re.fullmatch(r"pipeline \d+\.\d+\.\d+ \(git commit ([0-9a-f]{40}|unknown)\)\n",
                        result.stdout), result.stdout
