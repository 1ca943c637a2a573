"""`pipeline import csg`: the CSG authors' released CIFAR-10 checkpoints as our models.

The fixtures (tests/fixtures/csg_released, or $CSG_RELEASED_DIR) are unchanged copies of
three of the authors' files. Each converts to the model it was trained as, with no missing or
unexpected key, computes the logits of the authors' own forward (re-expressed below on their raw
state_dict: their shortcut cat(x, x·0), their dense concatenation [new, x]), exports exactly, has
the parameter count `pipeline summary` gives, and runs in `pipeline eval`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO
from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.methods import get_method
from pipeline.models import build_model
from pipeline.models.csg_import import concat_order, convert, load_released
from pipeline.models.summary import count_params

RELEASED = Path(os.environ.get("CSG_RELEASED_DIR", REPO / "tests" / "fixtures" / "csg_released"))
pytestmark = pytest.mark.skipif(not RELEASED.is_dir(),
                                reason=f"no released CSG checkpoints at {RELEASED} "
                                       f"(set CSG_RELEASED_DIR)")

RESNET56_CSG = "resnet56_csg_s12_c72.t7"
# file: (our model, model options, method, parameters: METHODS.md's reference counts where it
# has one; DenseNet-BC-40-36 [12,12,3,3]-72 as counted in the authors' file)
RELEASES = {
    "resnet56_original.t7": ("cifar_resnet56", {}, "baseline", 853_018),
    RESNET56_CSG: ("cifar_resnet56", {}, "csg", 160_450),
    "densenet_bc_40_36_csg_s12_c72.t7": ("cifar_densenet_bc_40_36", {}, "csg", 842_842),
}


# ---- the authors' forward (eval mode) on their raw state_dict, without `module.` ----

def _bn(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"],
                        s[f"{p}.bias"], False, 0.0, 1e-5)


def _generated(s, code, out_channels, in_channels, k=3):
    """Their kernel: CSG(code) viewed [⌈out/S⌉·S, ⌈in/S⌉·S, k, k], cropped."""
    csg = s.get("CSG.weight", s.get("CLG.weight"))
    size = math.isqrt(csg.shape[0] // (k * k))
    flat = s[code] @ csg.T
    return flat.view(math.ceil(out_channels / size) * size,
                     math.ceil(in_channels / size) * size, k, k)[:out_channels, :in_channels]


def authors_resnet(s, x):
    x = F.relu(_bn(F.conv2d(x, s["conv_1_3x3.weight"], padding=1), s, "bn_1"))
    for stage in (1, 2, 3):
        j = 0
        while f"stage_{stage}.{j}.bn_a.weight" in s:
            p, width = f"stage_{stage}.{j}", x.shape[1]
            planes = s[f"{p}.bn_a.weight"].numel()
            stride = 2 if stage > 1 and j == 0 else 1
            w1 = s.get(f"{p}.conv_a.weight", None)
            w1 = _generated(s, f"{p}.code", planes, width) if w1 is None else w1
            w2 = s.get(f"{p}.conv_b.weight", None)
            w2 = _generated(s, f"{p}.code2", planes, planes) if w2 is None else w2
            out = F.relu(_bn(F.conv2d(x, w1, stride=stride, padding=1), s, f"{p}.bn_a"))
            out = _bn(F.conv2d(out, w2, padding=1), s, f"{p}.bn_b")
            if stride != 1:  # DownsampleA
                x = x[:, :, ::2, ::2]
                x = torch.cat((x, x.mul(0)), 1)
            x = F.relu(x + out)
            j += 1
    return F.linear(F.avg_pool2d(x, 8).flatten(1), s["classifier.weight"], s["classifier.bias"])


def authors_densenet(s, x):
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for b in (1, 2, 3):
        j = 0
        while f"dense{b}.{j}.bn1.weight" in s:
            p = f"dense{b}.{j}"
            y = F.conv2d(F.relu(_bn(out, s, f"{p}.bn1")), s[f"{p}.conv1.weight"])
            growth = y.shape[1] // 4
            w2 = s.get(f"{p}.conv2.weight", None)
            w2 = _generated(s, f"{p}.code2", growth, 4 * growth) if w2 is None else w2
            out = torch.cat([F.conv2d(F.relu(_bn(y, s, f"{p}.bn2")), w2, padding=1), out], 1)
            j += 1
        out = F.relu(_bn(out, s, f"trans{b}.bn"))
        out = F.avg_pool2d(F.conv2d(out, s[f"trans{b}.conv.weight"]), 2) if b < 3 else \
            F.avg_pool2d(out, 8)
    return F.linear(out.flatten(1), s["linear.weight"], s["linear.bias"])


def authors_logits(state, model_name, x):
    forward = authors_densenet if "densenet" in model_name else authors_resnet
    with torch.no_grad():
        return forward({k: v.float() if v.is_floating_point() else v
                        for k, v in state.items()}, x)


def authors_param_count(state) -> int:
    """Their parameters: no BN statistics, and the generator once (not its per-block copies)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    copies = [k for k in state if k.endswith((".CSG.weight", ".CLG.weight"))]
    return sum(v.numel() for k, v in state.items() if not k.endswith(buffers)
               and k not in copies)


def summary_params(capsys, model, method, opts) -> int:
    args = ["summary", "--model", model, "--method", method, "--num-classes", "10",
            "--input-size", "32", "--json"]
    args += [a for k, v in opts.items() for a in ("--opt", f"{k}={v}")]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)["params"]


# Logits are O(10) after 56 layers: float32 rounding keeps the paths within ~1e-5 of each other
# (measured 1e-6–4e-6); a wrong channel or slice placement moves them by O(1).
LOGIT_TOL = 1e-4


@pytest.mark.unit
@pytest.mark.parametrize("file", sorted(RELEASES))
def test_release_converts_to_the_authors_model(file, capsys):
    model_name, opts, method, params = RELEASES[file]
    imported = convert(RELEASED / file, model_name, opts)
    assert imported.method == method and imported.num_classes == 10
    model = imported.model.eval()
    assert model.state_dict().keys() == \
        build_model(model_name, 10, method=method, **imported.opts).state_dict().keys()
    raw, _ = load_released(RELEASED / file)
    assert imported.generator_copies == sum(k.endswith(("CSG.weight", "CLG.weight"))
                                            for k in raw)
    assert count_params(model)[0] == params == authors_param_count(raw) == \
        summary_params(capsys, model_name, method, imported.opts)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        exported = get_method(method).export(model)(x)
    want = authors_logits(raw, model_name, x)
    assert want.abs().max() > 1
    torch.testing.assert_close(logits, want, rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(exported, logits, rtol=0, atol=LOGIT_TOL)


@pytest.mark.unit
def test_dense_concat_order_maps_ours_onto_theirs():
    # block input x = channels 0, 1; growth 2; after 2 layers ours [x, y1, y2], theirs [y2, y1, x]
    theirs = ["y2a", "y2b", "y1a", "y1b", "x0", "x1"]
    assert [theirs[i] for i in concat_order(2, 2, 2)] == ["x0", "x1", "y1a", "y1b", "y2a", "y2b"]


@pytest.mark.unit
def test_plain_densenet_layout_converts_to_the_baseline(tmp_path):
    """The authors' plain DenseNet (conv2 weights, no generator) — made here from the CSG file
    by generating its kernels — converts to our baseline with the same function."""
    file = RELEASED / "densenet_bc_40_36_csg_s12_c72.t7"
    raw, saved = load_released(file)
    plain = {}
    for key, value in raw.items():
        if key.endswith("code2"):
            growth = raw[key.replace("code2", "bn2.weight")].numel() // 4
            plain[key.replace("code2", "conv2.weight")] = _generated(raw, key, growth,
                                                                     4 * growth)
        elif not key.endswith("CLG.weight"):
            plain[key] = value
    torch.save({"net": {f"module.{k}": v for k, v in plain.items()}, "acc": saved["acc"],
                "epoch": saved["epoch"]}, tmp_path / "plain.t7")
    imported = convert(tmp_path / "plain.t7", "cifar_densenet_bc_40_36", {})
    csg = convert(file, "cifar_densenet_bc_40_36", {})
    assert imported.method == "baseline" and imported.generator_copies == 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(imported.model.eval()(x), csg.model.eval()(x), rtol=0,
                                   atol=LOGIT_TOL)


@pytest.mark.e2e
def test_import_writes_a_final_pt_that_eval_runs(tmp_path, capsys, pipeline_cli, digits_root):
    out = tmp_path / "released" / "final.pt"
    assert main(["import", "csg", str(RELEASED / RESNET56_CSG), "--model", "cifar_resnet56",
                 "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "csg" and record["opts"] == {"slice": 12, "code": 72}
    assert record["generator_copies"] == 28 and record["params"] == 160_450
    saved = torch.load(out, weights_only=True)
    assert saved.keys() == {"model", "config"}
    config_file = out.parent / "config.yaml"
    # the YAML beside it is the stored config, complete (every schema key), and valid
    assert saved["config"] == OmegaConf.to_container(load_config(config_file), resolve=True)
    config = saved["config"]
    assert (config["model"]["name"], config["method"]["name"]) == ("cifar_resnet56", "csg")
    assert config["model"]["opts"] == {"slice": 12, "code": 72}
    assert config["data"]["std"] == [0.2023, 0.1994, 0.2010] and config["data"]["recipe"] == "cifar"
    model = build_model("cifar_resnet56", 10, method="csg", **config["model"]["opts"])
    model.load_state_dict(saved["model"])
    result = pipeline_cli.run("eval", str(config_file), str(out), f"data.root={digits_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["event"] == "eval"
    assert evaluation["samples"] == sum(1 for f in (digits_root / "val").rglob("*")
                                        if f.is_file())
    assert evaluation["method/params"] == 160_450


def _import_error(capsys, file: Path, model: str, *opts: str, out: Path) -> str:
    args = ["import", "csg", str(file), "--model", model, "--out", str(out)]
    assert main(args + [a for o in opts for a in ("--opt", o)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and not out.exists()
    return err


@pytest.mark.unit
@pytest.mark.parametrize("file,model,opts,named", [
    (RESNET56_CSG, "cifar_resnet56", ("slice=16",),
     "module.CSG.weight has shape (1296, 72), cifar_resnet56 (csg, slice=16, code=72) expects "
     "(2304, 72)"),
    (RESNET56_CSG, "cifar_resnet56", ("code=128",), "module.CSG.weight has shape (1296, 72)"),
    ("densenet_bc_40_36_csg_s12_c72.t7", "cifar_resnet56", (),
     "module.conv1.weight has no counterpart in cifar_resnet56"),
    ("resnet56_original.t7", "cifar_resnet20", (),
     "module.stage_1.3.conv_a.weight has no counterpart in cifar_resnet20"),
    ("resnet56_original.t7", "cifar_resnet110", (), "no weights for layer1.9.conv1.weight"),
    ("densenet_bc_40_36_csg_s12_c72.t7", "cifar_densenet_bc_40_48", (),
     "module.conv1.weight has shape (72, 3, 3, 3)"),
    ("resnet56_original.t7", "cifar_resnet56", ("slice=12",), "holds no generator"),
    ("resnet56_original.t7", "resnet50", (), "no mapping of the CSG authors' checkpoints"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_key(file, model, opts, named,
                                                                 capsys, tmp_path):
    assert named in _import_error(capsys, RELEASED / file, model, *opts,
                                  out=tmp_path / "final.pt")


@pytest.mark.unit
def test_unequal_generator_copies_are_refused(capsys, tmp_path):
    saved = torch.load(RELEASED / RESNET56_CSG, map_location="cpu", weights_only=True)
    saved["net"]["module.stage_2.0.CSG.weight"] = saved["net"]["module.CSG.weight"] + 1e-3
    torch.save(saved, tmp_path / "edited.t7")
    err = _import_error(capsys, tmp_path / "edited.t7", "cifar_resnet56",
                        out=tmp_path / "final.pt")
    assert "generator copy module.stage_2.0.CSG.weight differs from module.CSG.weight" in err


@pytest.mark.unit
def test_existing_files_are_not_overwritten(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("kept")
    _import_error(capsys, RELEASED / RESNET56_CSG, "cifar_resnet56", out=tmp_path / "final.pt")
    assert (tmp_path / "config.yaml").read_text() == "kept"
