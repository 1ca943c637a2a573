"""Segmentation networks: the output contract of every head × method variant, dilation and
output stride, parameter counts, every method's hooks on them, `pipeline summary` at H×W."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck

from conftest import REPO
from pipeline.cli.main import main
from pipeline.config import ConfigError, load_config
from pipeline.methods import get_method
from pipeline.methods.csg import ConvSliceGenerator, generated_convs
from pipeline.methods.selectconv import selective_units
from pipeline.models import build_model
from pipeline.models.diagnostics import calibrate_batch_norm
from pipeline.models.segmentation.backbone import ResNetBackbone
from pipeline.models.segmentation.model import segmentation_model
from pipeline.models.segmentation.selective import selective_resnet_
from pipeline.models.summary import count_macs, count_params

pytestmark = pytest.mark.unit

HEADS = ("deeplabv3", "pspnet")
METHODS = ("baseline", "gated", "ce", "csg", "selectconv")
SIZE = (64, 96)   # non-square: height ≠ width catches a swapped axis
CLASSES = 19


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def params(module: nn.Module | None) -> int:
    return 0 if module is None else count_params(module)[0]


def hooks_opts(method: str) -> dict:
    # a budget that closes channels at initialisation, so that re-allocation happens
    return {"gamma": 0.3} if method == "selectconv" else {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", HEADS)
def test_variant_outputs_hooks_and_export(head, method):
    """Train mode: "out" and "aux" at the input's resolution; the method's hooks run (losses,
    epoch edits, eval meters, metrics); eval mode: "out" only, the auxiliary head idle; the
    exported model gives the same logits."""
    torch.manual_seed(0)
    model = build_model(f"{head}_resnet18", CLASSES, method=method)
    hooks = get_method(method, **hooks_opts(method))
    aux_calls = []
    model.aux_head.register_forward_hook(lambda *args: aux_calls.append(1))

    out = model(images())
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, CLASSES, *SIZE)
    extras = hooks.extra_losses(model, 0.5)
    loss = out["out"].logsumexp(1).mean() + 0.4 * out["aux"].logsumexp(1).mean()
    (loss + sum(extras.values(), torch.zeros(()))).backward()
    for weight in (model.head.classifier.weight, model.aux_head.classifier.weight,
                   model.backbone.conv1.weight):
        assert weight.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in extras.values())
    if method == "gated":
        assert extras["batch_shaping"] > 0
    edits = hooks.on_epoch_end(model, 0, 10, seed=0)
    if method == "selectconv":
        assert edits and sum(unit.num_copies for _, unit in selective_units(model)) > 0

    x = images(3, seed=1)
    calibrate_batch_norm(model, x)
    meters = hooks.eval_meters(model)
    for meter in meters:
        meter.attach(model)
    aux_calls.clear()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"} and out["out"].shape == (3, CLASSES, *SIZE)
    assert not aux_calls
    results = {}
    for meter in meters:
        results.update(meter.summarize(meter.sums()))
        meter.detach()
    if method == "gated":   # per image at this (non-square) resolution
        assert results["macs"] == count_macs(model, SIZE)
        assert 0 < results["dynamic_macs"] <= results["macs"]
    metrics = hooks.metrics(model)
    if method == "csg":     # both generators counted: materialised = the baseline network
        assert metrics["materialized_params"] == params(build_model(f"{head}_resnet18", CLASSES))

    exported = hooks.export(model)
    with torch.no_grad():
        got = exported(x)
    assert set(got) == {"out"}
    expected = out["out"]
    scale = expected.abs().max().item()
    torch.testing.assert_close(got["out"], expected, rtol=0, atol=1e-5 * max(scale, 1.0))


def test_without_the_auxiliary_head():
    model = build_model("pspnet_resnet18", 21, aux=False)
    assert model.aux_head is None
    assert set(model(images())) == {"out"}


@pytest.mark.parametrize("output_stride, c3, c4, rates", [
    (8, (8, 12), (8, 12), (12, 24, 36)),
    (16, (4, 6), (4, 6), (6, 12, 18)),
])
def test_output_stride_sets_feature_sizes_dilations_and_aspp_rates(output_stride, c3, c4, rates):
    model = build_model("deeplabv3_resnet18", CLASSES, output_stride=output_stride).eval()
    with torch.no_grad():
        f3, f4 = model.backbone(images())
    assert f3.shape[-2:] == c3 and f4.shape[-2:] == c4
    assert (f3.shape[1], f4.shape[1]) == model.backbone.channels == (256, 512)
    atrous = [branch[0].dilation for branch in model.head.context.branches[1:]]
    assert atrous == [(r, r) for r in rates]
    # basic blocks: the first 3×3 dilated (the stage's first block with the previous dilation)
    layer4 = model.backbone.layer4
    first, rest = (1, 2) if output_stride == 16 else (2, 4)
    assert layer4[0].conv1.dilation == (first, first) and layer4[1].conv1.dilation == (rest, rest)
    assert layer4[0].conv2.dilation == (1, 1) and layer4[0].downsample[0].stride == (1, 1)


@pytest.mark.parametrize("output_stride, replace", [(8, [False, True, True]),
                                                    (16, [False, False, True])])
def test_bottleneck_dilation_is_torchvisions(output_stride, replace):
    torch.manual_seed(0)
    ours = tvm.ResNet(Bottleneck, [1, 1, 2, 2])
    reference = tvm.ResNet(Bottleneck, [1, 1, 2, 2], replace_stride_with_dilation=replace)
    reference.load_state_dict(ours.state_dict())
    backbone = ResNetBackbone(ours, output_stride).eval()
    reference.eval()
    x = images(1)
    with torch.no_grad():
        f3, f4 = backbone(x)
        r = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        r3 = reference.layer3(reference.layer2(reference.layer1(r)))
        r4 = reference.layer4(r3)
    torch.testing.assert_close(f3, r3, rtol=0, atol=0)
    torch.testing.assert_close(f4, r4, rtol=0, atol=0)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="model.opts.output_stride: expected 8 or 16, got 12"):
        build_model("deeplabv3_resnet18", CLASSES, output_stride=12)
    with pytest.raises(ValueError, match="model.opts.dropout"):
        build_model("pspnet_resnet18", CLASSES, method="csg", dropout=1.5)
    with pytest.raises(ValueError, match="unknown model option 'gate_3x3'"):
        build_model("deeplabv3_resnet18", CLASSES, method="gated", gate_3x3=True)
    with pytest.raises(ValueError, match="unknown model option 'output_strid'"):
        build_model("deeplabv3_resnet18", CLASSES, output_strid=16)


def meta_model(name: str, num_classes: int, method: str = "baseline", **opts) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, num_classes, method=method, **opts)


def csg_saving(in_channels: int, out_channels: int, k: int = 3, s: int = 16,
               code: int = 128) -> int:
    """Kernel parameters minus the codes replacing them (the [s,s,k,k]-code CSG)."""
    codes = -(-in_channels // s) * -(-out_channels // s) * code
    return in_channels * out_channels * k * k - codes


# (classes, output stride): Cityscapes at 8, Pascal VOC (the CSG authors' recipe) at 16
@pytest.mark.parametrize("classes, output_stride, baseline, csg", [
    (19, 8, 87_085_926, 40_778_598),
    (21, 16, 87_087_466, 40_780_138),
])
def test_deeplabv3_resnet101_parameters_with_and_without_csg(classes, output_stride, baseline,
                                                            csg):
    plain = meta_model("deeplabv3_resnet101", classes, output_stride=output_stride)
    generated = meta_model("deeplabv3_resnet101", classes, "csg", output_stride=output_stride)
    assert params(plain) == baseline and params(generated) == csg
    # the backbones are the classification ResNets without their classifier
    fc = 2048 * 1000 + 1000
    assert params(plain.backbone) == params(meta_model("resnet101", 1000)) - fc == 42_500_160
    assert params(generated.backbone) == params(meta_model("resnet101", 1000, "csg")) - fc
    # the ASPP: three 2048 → 512 atrous kernels replaced by codes, plus a second CSG
    second_csg = 16 * 16 * 9 * 128
    assert params(plain.head) - params(generated.head) == 3 * csg_saving(2048, 512) - second_csg
    assert params(plain.aux_head) == params(generated.aux_head)


@pytest.mark.parametrize("name, method, total", [
    ("deeplabv3_resnet50", "baseline", 68_093_798),
    ("deeplabv3_resnet50", "csg", 31_256_422),
    ("pspnet_resnet50", "baseline", 48_956_262),
    ("pspnet_resnet50", "csg", 38_562_662),
])
def test_resnet50_parameter_counts(name, method, total):
    assert params(meta_model(name, CLASSES, method)) == total


@pytest.mark.parametrize("method", ("baseline", "gated", "ce", "csg"))
def test_backbone_keys_are_the_classification_resnets(method):
    """A classification checkpoint of the same variant loads into ``backbone.*`` (its
    classifier aside)."""
    resnet = build_model("resnet18", 10, method=method).state_dict()
    model = build_model("deeplabv3_resnet18", CLASSES, method=method).state_dict()
    backbone = {k.removeprefix("backbone."): v.shape for k, v in model.items()
                if k.startswith("backbone.")}
    assert backbone == {k: v.shape for k, v in resnet.items() if not k.startswith("fc.")}


def test_backbone_starts_from_a_classification_network(tmp_path):
    """model.backbone_init: torchvision's ResNet weights (a plain state_dict) or a final.pt of
    the same method load into backbone.*, the classifier left out; a network of another
    method or architecture is refused in one line naming the problem."""
    from pipeline.engine.artifacts import init_backbone

    resnet = build_model("resnet18", 10)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("deeplabv3_resnet18", CLASSES)
    assert init_backbone(model, tmp_path / "resnet18.pth", "baseline") == \
        len(resnet.state_dict()) - 2
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, resnet.state_dict()[key]), key

    gated = build_model("resnet18", 10, method="gated")
    final = {"model": gated.state_dict(), "config": {"method": {"name": "gated"}}}
    torch.save(final, tmp_path / "final.pt")
    model = build_model("deeplabv3_resnet18", CLASSES, method="gated")
    init_backbone(model, tmp_path / "final.pt", "gated")
    assert torch.equal(model.backbone.layer2[0].conv1.weight, gated.layer2[0].conv1.weight)
    with pytest.raises(ConfigError, match="was trained with method 'gated', this run uses 'ce'"):
        init_backbone(build_model("deeplabv3_resnet18", CLASSES, method="ce"),
                      tmp_path / "final.pt", "ce")

    torch.save(build_model("resnet50", 10).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(ConfigError, match=r"resnet50.pth does not fit this backbone: "
                                          r"layer1.0.conv1.weight has shape \(64, 64, 1, 1\)"):
        init_backbone(build_model("deeplabv3_resnet18", CLASSES), tmp_path / "resnet50.pth",
                      "baseline")
    with pytest.raises(ConfigError, match="no such file"):
        init_backbone(model, tmp_path / "nope.pt", "gated")


def test_backbone_init_is_for_segmentation_only():
    with pytest.raises(ConfigError, match="'model.backbone_init': a segmentation backbone's"):
        load_config(REPO / "configs/digits/baseline.yaml", ["model.backbone_init=x.pth"])
    cfg = load_config(REPO / "configs/cityscapes/synth_deeplabv3.yaml",
                      ["model.backbone_init=x.pth"])
    assert cfg.model.backbone_init == "x.pth"


def test_deeplab_csg_holds_two_generators_one_copy_each():
    model = build_model("deeplabv3_resnet18", CLASSES, method="csg", slice=8, code=16)
    entries = [k for k, v in model.state_dict().items() if k.endswith("csg.weight")]
    assert entries == ["backbone.csg.weight", "head.context.csg.weight"]
    backbone_csg, aspp_csg = model.backbone.csg, model.head.context.csg
    assert backbone_csg is not aspp_csg and backbone_csg.weight.shape == (8 * 8 * 9, 16)
    aspp = generated_convs(model.head)
    assert len(aspp) == 3 and all(c.generator is aspp_csg for c in aspp)
    assert all(c.generator is backbone_csg for c in generated_convs(model.backbone))
    assert [_pair(c.dilation) for c in aspp] == [(12, 12), (24, 24), (36, 36)]

    model(images())["out"].square().mean().backward()
    assert backbone_csg.weight.grad.abs().sum() > 0 and aspp_csg.weight.grad.abs().sum() > 0

    exported = get_method("csg").export(model)
    assert not generated_convs(exported)
    assert not any(isinstance(m, ConvSliceGenerator) for m in exported.modules())
    assert not any(m._forward_pre_hooks for m in exported.modules())


def test_binary_csg_binarises_both_generators():
    model = build_model("deeplabv3_resnet18", CLASSES, method="csg", binary=True)
    for csg in (model.backbone.csg, model.head.context.csg):
        assert not csg.weight.requires_grad and set(csg.weight.unique().tolist()) == {-0.5, 0.5}


def test_pspnet_csg_has_one_generator():
    model = build_model("pspnet_resnet18", CLASSES, method="csg")
    assert not generated_convs(model.head)
    assert [k for k in model.state_dict() if k.endswith("csg.weight")] == ["backbone.csg.weight"]


def test_selectconv_export_prunes_dilated_bottlenecks():
    """K = 0 units after dilated 3×3 units: export removes their closed inputs and the
    producing filters, keeping the dilation of the shrunk conv."""
    torch.manual_seed(0)
    resnet = selective_resnet_(tvm.ResNet(Bottleneck, [1, 1, 2, 2]))
    model = segmentation_model("deeplabv3", resnet, CLASSES, 8, True, 0.1, 16)
    generator = torch.Generator().manual_seed(0)
    for _, unit in selective_units(model):
        if unit.K == 0:
            unit.is_open[torch.rand(unit.in_channels, generator=generator) < 0.3] = 0
    x = images(2)
    calibrate_batch_norm(model, x)
    with torch.no_grad():
        expected = model(x)["out"]
    exported = get_method("selectconv").export(model)
    assert params(exported) < params(model)
    assert exported.backbone.layer4[1].unit2.conv.dilation == (4, 4)
    with torch.no_grad():
        got = exported(x)["out"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * max(expected.abs().max(), 1))


def flop_counted_macs(model: nn.Module, size: tuple[int, int]) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops() // 2


def test_summary_counts_a_segmentation_model_at_height_by_width(capsys):
    assert main(["summary", "--model", "deeplabv3_resnet18", "--num-classes", "19",
                 "--input-size", "64x96", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model = build_model("deeplabv3_resnet18", 19)
    assert record["input_size"] == [64, 96] and record["params"] == params(model)
    assert record["macs"] == flop_counted_macs(model, SIZE) == count_macs(model, SIZE)


def test_summary_reduction_against_the_baseline_with_the_same_head(capsys):
    assert main(["summary", "--model", "pspnet_resnet18", "--method", "csg", "--num-classes",
                 "19", "--input-size", "64x96", "--opt", "channels=64", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["baseline_opts"] == {"channels": 64}
    assert record["baseline_params"] == params(build_model("pspnet_resnet18", 19, channels=64))


def test_summary_bad_input_size_is_one_line(capsys):
    assert main(["summary", "--model", "resnet18", "--input-size", "1024x"]) == 2
    err = capsys.readouterr().err
    assert "--input-size '1024x'" in err and err.strip().count("\n") == 0
