"""The registry, the reference architectures' exact sizes and `pipeline summary`."""
import json

import pytest
import torch

from pipeline.cli.main import main
from pipeline.config import ConfigError
from pipeline.models import build_model
from pipeline.models.registry import model_options
from pipeline.models.summary import count_params

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name, classes, params", [
    ("cifar_resnet20", 10, 269_722),
    ("cifar_resnet56", 10, 853_018),
    ("cifar_densenet40", 10, 211_978),
    ("cifar_densenet_bc_40_48", 10, 2_733_130),
    ("resnet50", 1000, 25_557_032),
])
def test_reference_parameter_counts(name, classes, params):
    assert count_params(build_model(name, classes))[0] == params


def test_cifar_resnet_shapes_and_parameter_free_shortcuts():
    model = build_model("cifar_resnet20", 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    shortcut = model.layer2[0].downsample
    assert list(shortcut.parameters()) == []
    assert shortcut(torch.ones(1, 16, 8, 8)).shape == (1, 32, 4, 4)


def test_registry_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown model 'resnet9'"):
        build_model("resnet9", 10)
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        build_model("resnet18", 10, method="nosuch")
    with pytest.raises(ConfigError, match=r"unknown model option 'width' .*'model.opts.width'"):
        build_model("resnet18", 10, width=2)
    with pytest.raises(ConfigError, match=r"'model.opts.gate_hidden': expected an integer, "
                                          r"got 2.5"):
        build_model("resnet18", 10, method="gated", gate_hidden=2.5)
    with pytest.raises(ConfigError, match="at least one class, got num_classes=0"):
        build_model("resnet18", 0)


def test_a_builders_signature_is_its_option_schema():
    gated = model_options("resnet50", "gated")
    assert list(gated) == ["gate_hidden", "gate_3x3"]
    assert gated["gate_hidden"].annotation is int and gated["gate_3x3"].default is False
    assert model_options("resnet50") == {}
    # a segmentation variant passes its method's options on to that method's ResNet
    assert list(model_options("pspnet_resnet50", "gated")) == [
        "gate_hidden", "gate_3x3", "output_stride", "aux", "dropout", "channels"]


def test_summary_json(capsys):
    assert main(["summary", "--model", "resnet50", "--num-classes", "1000", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["params"] == 25_557_032 and record["trainable_params"] == 25_557_032
    assert abs(record["macs"] / 1e9 - 4.09) < 0.01 and record["input_size"] == 224


def test_summary_cifar_resnet56(capsys):
    assert main(["summary", "--model", "cifar_resnet56", "--num-classes", "10",
                 "--input-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 853_018


def test_summary_bad_option_is_one_line(capsys):
    assert main(["summary", "--model", "resnet18", "--opt", "nosep"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
