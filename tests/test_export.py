"""`pipeline export` and the saved-model formats: every method's inference form as TorchScript
and ONNX matching the trained model on real digits images, final.pt / exported.pt readable with
weights_only=True and rebuilt exactly, one-line refusals, the MLflow model registry.

The saved models are built, not trained: each digits config's model with its BN (and CE)
statistics set by train-mode forwards on real images, and selective convolution's
de-/re-allocation hook run once, so that K = 0 units are pruned and K > 0 slots are shifted
copies. Training changes values, not what an export does with them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_path
from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.data import build_loaders, build_val_loader
from pipeline.engine.artifacts import load_saved, write_final
from pipeline.export import RELATIVE_TOLERANCE
from pipeline.methods import get_method
from pipeline.methods.selectconv import selective_units
from pipeline.models import build_model

METHODS = ["baseline", "ce", "csg", "gated", "selectconv"]
# the form each format captures: gated's skipping blocks (per-image channel choice) neither
# script nor pass torch.export, so both formats take its masked form (the trained model in eval)
EXPECTED_FORM = {"baseline": "exported", "ce": "exported", "csg": "exported",
                 "gated": "trained", "selectconv": "exported"}


def digits_config(method: str, root: Path, *overrides: str):
    return load_config(config_path(f"digits/{method}.yaml"),
                       [f"data.root={root}", "data.backend=torchvision", "data.workers=0",
                        *overrides])


def write_saved(run_dir: Path, method: str, root: Path) -> Path:
    """final.pt and exported.pt of a digits model set up as the module docstring says."""
    cfg = digits_config(method, root, "data.batch_size=32")
    torch.manual_seed(0)
    train, _ = build_loaders(cfg.data, rank=0, world_size=1, seed=0)
    model = build_model(cfg.model.name, train.num_classes, method=method, **cfg.model.opts)
    hooks = get_method(method, **cfg.method.opts)
    model.train()
    with torch.no_grad():
        for step, (images, _) in enumerate(train.epoch(0)):
            model(images)
            if step == 2:
                break
    hooks.on_epoch_end(model, 0, 10, seed=0)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_final(run_dir, model, hooks, cfg, train.classes)
    return run_dir / "final.pt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_root) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("saved")
    return {m: write_saved(base / m, m, digits_root) for m in METHODS}


def val_images(root: Path, count: int, skip: int = 1) -> torch.Tensor:
    """Real validation images other than the exporter's first batch (after ``skip`` batches
    of 8), ``count`` of them."""
    cfg = digits_config("baseline", root, "data.val_batch_size=8")
    batches = iter(build_val_loader(cfg.data, rank=0, world_size=1))
    for _ in range(skip):
        next(batches)
    return next(batches)[0][:count]


def run_cli(capsys, *args: str) -> tuple[int, dict | str]:
    code = main(list(args))
    captured = capsys.readouterr()
    if code:
        return code, captured.err.strip()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out   # stdout holds the JSON line only
    return code, json.loads(lines[0])


def within_tolerance(actual: torch.Tensor, expected: torch.Tensor) -> None:
    delta = (actual - expected).abs().max().item()
    assert delta <= RELATIVE_TOLERANCE * expected.abs().max().item(), delta


@pytest.mark.unit
def test_final_and_exported_load_with_weights_only_and_rebuild_exactly(saved, digits_root):
    images = val_images(digits_root, 5)
    for method, final in saved.items():
        record = torch.load(final, weights_only=True)
        assert record.keys() == {"model", "config", "classes"}
        assert record["config"]["model"]["num_classes"] == 10 and len(record["classes"]) == 10
        exported = torch.load(final.with_name("exported.pt"), weights_only=True)
        assert exported.keys() == {"model", "config", "classes", "buffers"}
        trained = load_saved(final).model
        rebuilt = load_saved(final.with_name("exported.pt")).model
        with torch.no_grad():
            expected = get_method(method).export(trained)(images)
            assert torch.equal(rebuilt(images), expected), method
            within_tolerance(rebuilt(images), trained(images))


@pytest.mark.unit
def test_selectconv_exported_skeleton_is_the_pruned_one(saved):
    """The skeleton comes from the trained buffers: units the hook pruned are narrower."""
    trained = load_saved(saved["selectconv"]).model
    pruned = {name: int(unit.is_open.sum()) for name, unit in selective_units(trained)
              if unit.K == 0 and unit.is_open.sum() < unit.in_channels}
    assert pruned, "the hook closed nothing: the test model does not exercise pruning"
    rebuilt = dict(load_saved(saved["selectconv"].with_name("exported.pt")).model
                   .named_modules())
    for name, kept in pruned.items():
        assert rebuilt[name][2].in_channels == kept   # BN → ReLU → Conv over open inputs


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_and_matches(saved, digits_root, tmp_path, capsys, method, fmt):
    out = tmp_path / f"{method}.{fmt}"
    code, record = run_cli(capsys, "export", str(saved[method]), f"data.root={digits_root}",
                           "data.backend=torchvision", "data.workers=0", "--format", fmt,
                           "--out", str(out))
    assert code == 0, record
    assert record["form"] == EXPECTED_FORM[method] and record["images"] == 8
    assert record["max_abs_delta"] <= record["tolerance"] == pytest.approx(
        RELATIVE_TOLERANCE * record["output_scale"])
    # independently of the exporter's own check: other images, another batch size
    images = val_images(digits_root, 5)
    with torch.no_grad():
        expected = load_saved(saved[method]).model(images)
    if fmt == "torchscript":
        with torch.no_grad():
            actual = torch.jit.load(str(out))(images)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        actual = torch.from_numpy(session.run(["output"], {"images": images.numpy()})[0])
    assert actual.shape == expected.shape == (5, 10)
    within_tolerance(actual, expected)


@pytest.mark.unit
def test_state_dict_format_round_trips(saved, digits_root, tmp_path, capsys):
    out = tmp_path / "ce-exported.pt"
    code, record = run_cli(capsys, "export", str(saved["ce"]), f"data.root={digits_root}",
                           "data.backend=torchvision", "--format", "state_dict", "--out", str(out))
    assert code == 0, record
    assert record["max_abs_delta"] <= record["tolerance"]
    written = torch.load(out, weights_only=True)
    original = torch.load(saved["ce"].with_name("exported.pt"), weights_only=True)
    assert written.keys() == original.keys()
    assert all(torch.equal(written["model"][k], v) for k, v in original["model"].items())
    images = val_images(digits_root, 5)
    with torch.no_grad():
        assert torch.equal(load_saved(out).model(images),
                           load_saved(saved["ce"].with_name("exported.pt")).model(images))


@pytest.mark.unit
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(saved, digits_root, tmp_path,
                                                               capsys):
    out = tmp_path / "x.onnx"
    code, err = run_cli(capsys, "export", config_path("digits/selectconv.yaml"),
                        str(saved["csg"]), f"data.root={digits_root}",
                        "--format", "onnx", "--out", str(out))
    assert code == 2 and "\n" not in err and not out.exists()
    assert "does not fit cifar_densenet16 (method selectconv)" in err
    code, err = run_cli(capsys, "export", str(saved["csg"]), f"data.root={digits_root}",
                        "model.opts.code=64", "--format", "onnx", "--out", str(out))
    assert code == 2 and "\n" not in err and not out.exists()
    assert "conv1.codes has shape (1, 128), the model expects (1, 64)" in err


@pytest.mark.unit
def test_gated_exported_pt_has_no_onnx_form_and_says_so(saved, digits_root, tmp_path, capsys):
    """exported.pt of a gated model holds only its skipping form, which torch.export refuses
    (channels chosen per image); the masked form needs the trained weights of final.pt."""
    out = tmp_path / "gated.onnx"
    code, err = run_cli(capsys, "export", str(saved["gated"].with_name("exported.pt")),
                        f"data.root={digits_root}", "data.backend=torchvision",
                        "--format", "onnx", "--out", str(out))
    assert code == 2 and err.count("\n") == 0 and not out.exists()
    assert "no form of this model exports to onnx" in err and "export the final.pt" in err


@pytest.mark.unit
def test_an_export_that_does_not_match_is_refused(saved, digits_root, tmp_path, capsys,
                                                  monkeypatch):
    """A form whose outputs drift (here: one conv weight nudged by 1e-2) is not written."""
    from pipeline.export import exporter

    def drifting(*args, **kwargs):
        forms = real_forms(*args, **kwargs)
        with torch.no_grad():
            next(m for m in forms[0].module.modules()
                 if isinstance(m, torch.nn.Conv2d)).weight.add_(1e-2)
        return forms

    real_forms = exporter.inference_forms
    monkeypatch.setattr(exporter, "inference_forms", drifting)
    out = tmp_path / "drift.pt"
    code, err = run_cli(capsys, "export", str(saved["baseline"]), f"data.root={digits_root}",
                        "--format", "torchscript", "--out", str(out))
    assert code == 2 and err.count("\n") == 0 and "export refused" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.e2e
def test_register_logs_a_servable_onnx_model(saved, digits_root, tmp_path, capsys,
                                             monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)   # artifacts under ./mlruns of the scratch directory
    code, record = run_cli(capsys, "export", str(saved["csg"]), f"data.root={digits_root}",
                           "data.backend=torchvision", "--format", "onnx",
                           "--out", str(tmp_path / "csg.onnx"), "--register", "digits-csg")
    assert code == 0, record
    assert record["registered"] == "digits-csg" and record["model_uri"] == "models:/digits-csg/1"
    run = mlflow.get_run(record["run_id"])  # the store of MLFLOW_TRACKING_URI (no global set:
    # a tracking URI set in-process would outlive this test)
    assert run.data.tags["pipeline.kind"] == "export" and run.data.tags["method"] == "csg"
    model = mlflow.pyfunc.load_model(record["model_uri"])
    signature = model.metadata.signature.to_dict()
    assert json.loads(signature["inputs"])[0]["tensor-spec"]["shape"] == [-1, 3, 32, 32]
    assert json.loads(signature["outputs"])[0]["tensor-spec"]["shape"] == [-1, 10]
    images = val_images(digits_root, 5)
    predicted = model.predict(images.numpy())
    actual = predicted["output"] if isinstance(predicted, dict) else np.asarray(predicted)
    with torch.no_grad():
        expected = load_saved(saved["csg"]).model(images)
    within_tolerance(torch.from_numpy(np.asarray(actual)), expected)


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory) -> tuple[Path, Path]:
    """A DeepLabV3 (ResNet-18) final.pt and a small synthetic Cityscapes tree (4 val scenes)."""
    from pipeline.data.segmentation.labels import cityscapes_classes
    from pipeline.data.segmentation.synth import write_cityscapes_synth

    base = tmp_path_factory.mktemp("segmentation")
    root = base / "cityscapes"
    write_cityscapes_synth(root, size=(128, 64), count=20)
    cfg = load_config(config_path("cityscapes/synth_deeplabv3.yaml"),
                      [f"data.root={root}", "data.backend=torchvision", "data.workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 19, **cfg.model.opts)
    write_final(base, model, get_method("baseline"), cfg, list(cityscapes_classes()))
    return base / "final.pt", root


@pytest.mark.e2e
def test_a_segmentation_model_exports_its_out_logits(segmentation, tmp_path, capsys):
    final, root = segmentation
    out = tmp_path / "deeplab.onnx"
    code, record = run_cli(capsys, "export", str(final), f"data.root={root}",
                           "--format", "onnx", "--out", str(out))
    assert code == 0, record
    assert record["images"] == 4 and record["max_abs_delta"] <= record["tolerance"]
    import onnxruntime

    images = torch.randn(3, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run(["output"], {"images": images.numpy()})[0])
    with torch.no_grad():
        expected = load_saved(final).model(images)["out"]
    assert actual.shape == expected.shape == (3, 19, 64, 128)
    within_tolerance(actual, expected)


@pytest.mark.unit
def test_register_needs_onnx(saved, digits_root, tmp_path, capsys):
    code, err = run_cli(capsys, "export", str(saved["ce"]), f"data.root={digits_root}",
                        "--format", "torchscript", "--out", str(tmp_path / "x.pt"),
                        "--register", "x")
    assert code == 2 and err.count("\n") == 0 and "--register needs --format onnx" in err
