"""Config composition, overrides and validation: every mistake names its key, at load, before
any data is read: unknown keys, wrong types, nonsense numbers, and model / method options the
builder or the method does not take."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, flatten, load_config, load_config_dict
from pipeline.errors import InputError

pytestmark = pytest.mark.unit
BASELINE = Path(__file__).resolve().parents[1] / "configs" / "digits" / "baseline.yaml"


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_compose_in_order_and_overrides_win(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.1, weight_decay: 1.0e-4}\nschedule: {epochs: 5}\n")
    cfg_file = write(tmp_path / "run.yaml", "defaults: [base.yaml]\noptim: {lr: 0.2}\n")
    cfg = load_config(cfg_file, ["schedule.epochs=7", "method.name=csg", "model.opts.slice=12"])
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


def test_config_errors_are_input_errors():
    assert issubclass(ConfigError, InputError) and issubclass(InputError, ValueError)


@pytest.mark.parametrize("override, message", [
    ("schedule.epochs=0", "config key 'schedule.epochs': expected > 0, got 0"),
    ("schedule.iterations=-1", "config key 'schedule.iterations': expected >= 0, got -1"),
    ("engine.max_steps_per_epoch=-1", "'engine.max_steps_per_epoch': expected >= 0, got -1"),
    ("optim.lr=0", "config key 'optim.lr': expected > 0, got 0.0"),
    ("optim.lr=-0.1", "config key 'optim.lr': expected > 0, got -0.1"),
    ("engine.grad_accum=0", "config key 'engine.grad_accum': expected > 0, got 0"),
    ("data.batch_size=0", "config key 'data.batch_size': expected > 0, got 0"),
    ("data.workers=-1", "config key 'data.workers': expected >= 0, got -1"),
    ("engine.log_every=0", "config key 'engine.log_every': expected > 0, got 0"),
    ("engine.sync_every=0", "config key 'engine.sync_every': expected > 0, got 0"),
    ("checkpoint.keep_last=0", "config key 'checkpoint.keep_last': expected > 0, got 0"),
    ("model.num_classes=-3", "config key 'model.num_classes': expected >= 0, got -3"),
    ("data.std=[0.5,0,0.5]", "'data.std': expected every value > 0, got [0.5, 0.0, 0.5]"),
    ("optim.lr_mult={head: 0}", "'optim.lr_mult': expected every value > 0, got {'head': 0.0}"),
])
def test_nonsense_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASELINE, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["method.name=ce", "method.opts.foo=1"],
     "unknown method option 'foo' of 'ce' (config key 'method.opts.foo'; accepted: none)"),
    (["method.name=gated", "method.opts.gama=0.5"],
     "config key 'method.opts.gama'; accepted: gamma, gamma_end_epoch,"),
    (["method.name=gated", "method.opts.gamma=abc"],
     "config key 'method.opts.gamma': expected a number, got 'abc'"),
    (["method.name=gated", "method.opts.gamma=-1"], "method.opts.gamma: expected a number >= 0"),
    (["model.opts.width=2"], "unknown model option 'width' of 'cifar_resnet20' with method "
                             "'baseline' (config key 'model.opts.width'; accepted: none)"),
    (["method.name=csg", "model.opts.slice=abc"],
     "config key 'model.opts.slice': expected an integer or null, got 'abc'"),
    (["method.name=csg", "model.opts.binary=1"],
     "config key 'model.opts.binary': expected true or false, got 1"),
    (["method.name=selectconv", "model.name=cifar_densenet16", "method.opts.n_max=1.5"],
     "config key 'method.opts.n_max': expected an integer or null, got 1.5"),
    # a segmentation variant takes its own options and those of its method's ResNet
    (["model.name=deeplabv3_resnet18", "method.name=ce", "model.opts.gate_hidden=8"],
     "unknown model option 'gate_hidden' of 'deeplabv3_resnet18' with method 'ce' (config key "
     "'model.opts.gate_hidden'; accepted: group_size, stem_group_size, iterations, "
     "trace_rescale, output_stride, aux, dropout, channels)"),
    (["method.name=nosuch"], "config key 'method.name': unknown method 'nosuch' (expected one of "
                             "['baseline', 'ce', 'csg', 'gated', 'selectconv'])"),
    (["model.name=resnet9"], "config key 'model.name': unknown model 'resnet9'"),
    (["model.name=resnet50", "method.name=selectconv"],
     "config key 'model.name': method 'selectconv' does not support model 'resnet50'"),
])
def test_model_and_method_options_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(BASELINE, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_options_that_fit_their_signature_load():
    cfg = load_config(BASELINE, ["model.name=deeplabv3_resnet18", "method.name=ce",
                                 "model.opts.group_size=8", "model.opts.output_stride=16",
                                 "method.opts={}"])
    assert cfg.model.opts == {"group_size": 8, "output_stride": 16}
    cfg = load_config(BASELINE, ["model.name=cifar_densenet16", "method.name=selectconv",
                                 "method.opts.n_max=null", "method.opts.gamma=0"])
    assert cfg.method.opts == {"n_max": None, "gamma": 0}  # an int where a float is declared


@pytest.mark.parametrize("text, message", [
    ("model: resnet50\n", "config key 'model': expected a mapping of its keys (e.g. model: "
                          "{name: …}), got 'resnet50'"),
    ("method: gated\n", "config key 'method': expected a mapping"),
    ("data: [1, 2]\n", "config key 'data': expected a mapping"),
])
def test_a_section_given_as_a_scalar_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "c.yaml", text))
    assert message in str(err.value)


def test_a_section_given_as_a_scalar_override_names_the_key():
    with pytest.raises(ConfigError, match="config key 'model': expected a mapping"):
        load_config(BASELINE, ["model=resnet50"])


def test_load_config_dict_validates_a_saved_config_like_a_file():
    cfg = load_config(BASELINE, ["schedule.epochs=3"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    again = load_config_dict(saved, ["optim.lr=0.2"])
    assert again.schedule.epochs == 3 and again.optim.lr == 0.2 and again.name == cfg.name
    assert OmegaConf.is_readonly(again)
    assert load_config_dict({**saved, "name": ""}, name="run-dir").name == "run-dir"
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config_dict({**saved, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="'schedule.epochs': expected > 0"):
        load_config_dict(saved, ["schedule.epochs=0"])


def test_every_shipped_config_loads():
    configs = [p for p in (BASELINE.parents[1]).rglob("*.yaml")
               if not p.name.startswith("_") and p.name != "experiments.yaml"]
    assert configs
    for path in configs:
        load_config(path)
