"""Every shipped config builds what it trains: its model (on the meta device: shapes and
structure without allocating, so a ResNet-101 DeepLab costs nothing) and its method, with the
options it names. A config that loads but whose builder refuses a value would otherwise fail only
once a job got its GPUs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
from pipeline.config import load_config
from pipeline.methods import get_method
from pipeline.models import build_model

pytestmark = pytest.mark.unit
# Composable fragments (_*.yaml) are not runs; experiments.yaml is the experiment catalogue.
CONFIGS = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")
                 if not p.name.startswith("_") and p.name != "experiments.yaml")


def test_there_are_configs_of_every_task_and_method():
    loaded = [load_config(REPO / "configs" / path) for path in CONFIGS]
    assert {cfg.task for cfg in loaded} == {"classification", "segmentation"}
    assert {cfg.method.name for cfg in loaded} == {"baseline", "ce", "csg", "gated", "selectconv"}


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_builds_its_model_and_method(path: Path):
    cfg = load_config(REPO / "configs" / path)
    # model.num_classes 0 means "the class folders of the data": any count builds the same net
    num_classes = cfg.model.num_classes or 10
    with torch.device("meta"):
        model = build_model(cfg.model.name, num_classes, method=cfg.method.name,
                            **cfg.model.opts)
    method = get_method(cfg.method.name, **cfg.method.opts)
    assert method.name == cfg.method.name
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(p.device.type == "meta" for p in model.parameters())
    grouped = {id(p) for group in method.param_groups(model) for p in group["params"]}
    assert grouped <= {id(p) for p in model.parameters()}
