"""Config composition, overrides and validation: every mistake names its key."""
import pytest

from pipeline.config import ConfigError, flatten, load_config


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_compose_in_order_and_overrides_win(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.1, weight_decay: 1.0e-4}\nschedule: {epochs: 5}\n")
    cfg_file = write(tmp_path / "run.yaml", "defaults: [base.yaml]\noptim: {lr: 0.2}\n")
    cfg = load_config(cfg_file, ["schedule.epochs=7", "model.opts.slice=12"])
    assert cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 1e-4
    assert cfg.schedule.epochs == 7 and cfg.model.opts.slice == 12
    assert flatten(cfg)["optim.lr"] == 0.2


@pytest.mark.parametrize("text, overrides, message", [
    ("optim: {lrr: 1}\n", [], "unknown config key 'optim.lrr'"),
    ("", ["nokey=1"], "unknown config key 'nokey'"),
    ("optim: {lr: abc}\n", [], "config key 'optim.lr'"),
    ("", ["data.batch_size=1.5"], "config key 'data.batch_size'"),
    ("", ["engine.zero_stage=3"], "config key 'engine.zero_stage'"),
    ("", ["data.backend=pil"], "config key 'data.backend'"),
    ("", ["novalue"], "not of the form key=value"),
])
def test_bad_keys_and_values_are_one_line_errors_naming_the_key(tmp_path, text, overrides,
                                                                 message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "c.yaml", text), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = [p for p in Path("configs").rglob("*.yaml")
               if not p.name.startswith("_") and p.name != "experiments.yaml"]
    assert configs
    for path in configs:
        load_config(path)
