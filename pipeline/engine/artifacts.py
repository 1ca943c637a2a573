"""What a finished run leaves for inference, and the one loader of every saved model.

Both files hold only tensors and plain values (``torch.load(weights_only=True)`` reads them):

    final.pt     {"model": the trained state_dict, "config": the resolved config (with
                  model.num_classes filled in), "classes": the class names}
    exported.pt  {"model": the state_dict of method.export(trained), "config", "classes",
                  "buffers": the trained model's persistent buffers}

The exported architecture is rebuilt, not unpickled: ``build_model(config)`` with the trained
buffers loaded, then ``method.export`` gives the skeleton into which the exported state_dict
loads. The buffers are what a method's export decides its structure from (selective
convolution prunes by ``is_open`` and copies by ``ptr``; CE folds ``running_kappa``); parameter
values never decide a shape, so the skeleton needs no trained parameter (a few KB of BN
statistics ride along).

``read_checkpoint`` also reads a converted checkpoint (``pipeline import csg``: final.pt
without classes) and a DeepSpeed checkpoint directory (no config inside: the run's
``config.yaml`` is found beside it or up to two folders above, ``runs/<name>/checkpoints/<tag>``).
``checkpoint_config`` is the checkpoint's config unless a CONFIG file is given, with key=value
overrides on top; ``build_saved_model`` builds the model it describes and loads it, refusing a
checkpoint that does not fit with one line naming the first mismatching key.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.config import ConfigError, load_config, load_config_dict
from pipeline.methods import Method, get_method
from pipeline.models import build_model
from pipeline.models.summary import count_params

from . import checkpoint as ckpt

FINAL, EXPORTED = "final.pt", "exported.pt"
RUN_CONFIG = "config.yaml"


def config_record(cfg: DictConfig, num_classes: int) -> dict:
    """The config as saved: resolved, plain values, ``model.num_classes`` filled in."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["num_classes"] = config["model"]["num_classes"] or num_classes
    return config


def trained_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of ``model`` as its state_dict names them."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k not in params}


def exported_record(exported: nn.Module, buffers: dict[str, torch.Tensor], config: dict,
                    classes: Sequence[str]) -> dict:
    """The exported.pt contents: ``exported`` = method.export(trained), ``buffers`` the
    trained model's (``trained_buffers``)."""
    return {"model": exported.state_dict(), "config": config, "classes": list(classes),
            "buffers": buffers}


def write_final(run_dir: Path, trained: nn.Module, method: Method, cfg: DictConfig,
                classes: Sequence[str]) -> int:
    """Write ``final.pt`` and ``exported.pt`` of ``trained`` (a plain model, free of the
    engine's wrappers) into ``run_dir``; returns the exported model's parameter count."""
    config = config_record(cfg, len(classes))
    torch.save({"model": trained.state_dict(), "config": config, "classes": list(classes)},
               run_dir / FINAL)
    exported = method.export(trained.eval())
    torch.save(exported_record(exported, trained_buffers(trained), config, classes),
               run_dir / EXPORTED)
    return count_params(exported)[0]


@dataclass
class Checkpoint:
    """A saved model as read from disk (nothing built yet)."""
    path: Path
    state: dict[str, torch.Tensor]
    config: dict | None = None            # None: a DeepSpeed directory (see run_config)
    classes: list[str] | None = None      # None: a converted or DeepSpeed checkpoint
    buffers: dict[str, torch.Tensor] | None = None   # set only for exported.pt: the export form
    run_config: Path | None = None        # a DeepSpeed directory's config.yaml, when found

    @property
    def exported(self) -> bool:
        return self.buffers is not None


def _run_config(directory: Path) -> Path | None:
    for folder in (directory, directory.parent, directory.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    return None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """final.pt, exported.pt, a converted final.pt, or a DeepSpeed checkpoint / tag directory."""
    path = Path(path)
    if path.is_dir():
        return Checkpoint(path, ckpt.load_module_state(path), run_config=_run_config(path))
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of many kinds: the file is not ours
        raise ConfigError(f"{path}: not a final.pt / exported.pt (torch.load with "
                          f"weights_only=True: {str(err).splitlines()[0][:200]})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict)
            and isinstance(saved.get("config"), dict)):
        raise ConfigError(f"{path}: expected a dict with 'model' (a state_dict) and 'config' "
                          "(final.pt / exported.pt)")
    return Checkpoint(path, saved["model"], saved["config"], saved.get("classes"),
                      saved.get("buffers"))


def checkpoint_config(checkpoint: Checkpoint, config_file: str | Path | None = None,
                      overrides: Sequence[str] = ()) -> DictConfig:
    """The validated config: ``config_file`` if given, else the checkpoint's own; overrides
    on top."""
    if config_file is not None:
        return load_config(config_file, overrides)
    if checkpoint.config is None:
        if checkpoint.run_config is None:
            raise ConfigError(f"{checkpoint.path}: a DeepSpeed checkpoint holds no config and no "
                              f"{RUN_CONFIG} is beside it or above it: give CONFIG")
        return load_config(checkpoint.run_config, overrides)
    return load_config_dict(checkpoint.config, overrides, name=checkpoint.path.parent.name)


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(map(str, t.shape))})"


def load_fitting(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
                 keys: Sequence[str] | None = None) -> None:
    """Load ``state`` into ``module`` (only ``keys`` of its state_dict, when given), or raise
    ConfigError naming the first key that does not fit."""
    expected = module.state_dict()
    wanted = list(expected) if keys is None else list(keys)
    for key in wanted:
        if key not in state:
            raise ConfigError(f"{source} does not fit {what}: it has no {key}")
        if key in expected and state[key].shape != expected[key].shape:
            raise ConfigError(f"{source} does not fit {what}: {key} has shape "
                              f"{_shape(state[key])}, the model expects {_shape(expected[key])}")
    for key in state:
        if key not in expected or key not in wanted:
            raise ConfigError(f"{source} does not fit {what}: {key} has no counterpart in it")
    module.load_state_dict(state, strict=keys is None)



def init_backbone(model: nn.Module, path: str | Path, method: str) -> int:
    """Start a segmentation model's backbone from a classification network (``model.
    backbone_init``): a final.pt of a run with the same method, or a plain state_dict such as
    torchvision's ResNet weights; its classifier ``fc.*`` is left out and every other tensor
    must fit. Returns the number of tensors loaded."""
    source = f"config key 'model.backbone_init': {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{source}: no such file (expected a final.pt or a .pth state_dict)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of many kinds
        raise ConfigError(f"{source}: not a final.pt or state_dict ("
                          f"{str(err).splitlines()[0][:200]})") from None
    if isinstance(saved, dict) and isinstance(saved.get("config"), dict):  # our final.pt
        trained = saved["config"].get("method", {}).get("name", "baseline")
        if trained != method:
            raise ConfigError(f"{source} was trained with method {trained!r}, this run uses "
                              f"{method!r}")
        saved = saved.get("model")
    if not (isinstance(saved, dict) and all(torch.is_tensor(v) for v in saved.values())):
        raise ConfigError(f"{source}: expected a final.pt or a state_dict of tensors")
    weights = {k: v for k, v in saved.items() if not k.startswith("fc.")}
    load_fitting(model.backbone, weights, source, "this backbone")
    return len(weights)

def _described(cfg: DictConfig) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in cfg.model.opts.items())
    return f"{cfg.model.name} (method {cfg.method.name}{', ' + opts if opts else ''})"


def build_saved_model(checkpoint: Checkpoint, cfg: DictConfig, num_classes: int) -> nn.Module:
    """The model ``checkpoint`` holds, in eval mode on the CPU: the trained form, or for an
    exported.pt the method's exported form rebuilt from the config and the trained buffers."""
    what = _described(cfg)
    model = build_model(cfg.model.name, num_classes, method=cfg.method.name, **cfg.model.opts)
    source = str(checkpoint.path)
    if not checkpoint.exported:
        load_fitting(model, checkpoint.state, source, what)
        return model.eval()
    load_fitting(model, checkpoint.buffers, f"{source} (trained buffers)", what,
                 keys=list(trained_buffers(model)))
    exported = get_method(cfg.method.name, **cfg.method.opts).export(model.eval())
    load_fitting(exported, checkpoint.state, source, f"the exported form of {what}")
    return exported.eval()


def num_classes_of(cfg: DictConfig, checkpoint: Checkpoint, found: int) -> int:
    """The model's outputs: the config's, else the checkpoint's class list, else ``found``
    (the class folders of the data)."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    return len(checkpoint.classes) if checkpoint.classes else found


@dataclass
class Saved:
    model: nn.Module
    config: DictConfig
    checkpoint: Checkpoint


def load_saved(path: str | Path, config_file: str | Path | None = None,
               overrides: Sequence[str] = (), num_classes: int = 0) -> Saved:
    """Any saved model (see ``read_checkpoint``) built and loaded, with its config.
    ``num_classes`` is needed only when neither the config nor the checkpoint records it."""
    checkpoint = read_checkpoint(path)
    cfg = checkpoint_config(checkpoint, config_file, overrides)
    classes = num_classes_of(cfg, checkpoint, num_classes)
    if not classes:
        raise ConfigError(f"{path}: the number of classes is not recorded: set model.num_classes")
    return Saved(build_saved_model(checkpoint, cfg, classes), cfg, checkpoint)
