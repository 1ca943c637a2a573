"""The experiment catalogue (configs/experiments.yaml): every listed config exists, loads and
builds, and every number the catalogue takes from a count (parameters, static MACs) is the
count of the model that config builds."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models import build_model
from pipeline.models.summary import count_macs, count_params
from pipeline.tracking.report.catalogue import load_catalogue, resolve

pytestmark = pytest.mark.unit

CATALOGUE = load_catalogue()


def _build(cfg, device: str = "cpu"):
    with torch.device(device):
        return build_model(cfg.model.name, cfg.model.num_classes, method=cfg.method.name,
                           **cfg.model.opts)


def test_catalogue_lists_configs_of_every_paper():
    assert {"selectconv", "gated", "ce", "csg"} <= set(CATALOGUE.papers)
    assert {e.paper for e in CATALOGUE.entries} == set(CATALOGUE.papers)
    pairs = [(e.config, e.paper) for e in CATALOGUE.entries]
    assert len(pairs) == len(set(pairs)), "a config is listed twice for the same paper"


@pytest.mark.parametrize("entry", CATALOGUE.entries,
                         ids=lambda e: f"{e.paper}:{e.config.parent.name}/{e.config.stem}")
def test_listed_config_exists_and_builds(entry):
    assert entry.config.is_file(), entry.config
    cfg = load_config(entry.config)
    point = resolve(entry)
    assert point.model == cfg.model.name and point.method == cfg.method.name
    model = _build(cfg, "meta")  # structure only: no memory, no initialisation work
    if "params" in entry.reported:
        assert count_params(model)[0] == entry.reported["params"]
    if "macs" in entry.reported:  # reference MACs are printed to 3-4 digits
        macs = count_macs(_build(cfg), cfg.data.image_size)
        assert macs == pytest.approx(entry.reported["macs"], rel=2e-3)


def test_a_bad_entry_is_one_line_naming_it(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text("papers: {ce: {title: CE}}\n"
                    "experiments:\n"
                    "  - {config: a.yaml, paper: ce, setting: x, source: y,"
                    " reported: {top_1: 70}}\n")
    with pytest.raises(ConfigError, match=r"experiments\[0\]\.reported: unknown key 'top_1'"):
        load_catalogue(path)
    path.write_text("papers: {ce: {title: CE}}\n"
                    "experiments:\n"
                    "  - {config: a.yaml, paper: gated, setting: x, source: y}\n")
    with pytest.raises(ConfigError, match=r"experiments\[0\]: paper 'gated' is not one of"):
        load_catalogue(path)
