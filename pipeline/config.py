"""The one typed config schema, loaded, composed and validated once at the edge.

A YAML file may list ``defaults:`` (paths relative to itself) that are merged first, in order;
then the file itself; then ``key=value`` overrides from the command line. The result is
merged onto the structured schema below, so an unknown key or a value of the wrong type is a
``ConfigError`` that names the key. Numbers outside their range (``RANGES``) are refused too,
and so are ``model.opts`` / ``method.opts`` that the model builder or the method does not take
or takes with another type: their signatures are the options' schema (``check_options``).
All of this happens at load, before any data is read or a job is queued.
"""
from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import InputError


class ConfigError(InputError):
    """A bad config file, key or value; the message is one line naming it."""


@dataclass
class DataConfig:
    root: str = "data/digits"              # ROOT/{train,val}/<class>/<image>
    backend: str = "dali"                  # dali | torchvision
    recipe: str = "imagenet"               # imagenet (random-resized crop) | cifar (pad + crop)
    image_size: int = 224                  # train crop and val centre crop
    val_resize_ratio: float = 0.875        # val: resize shorter side to image_size / ratio
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])   # random-resized crop
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    pad: int = 4                           # cifar recipe: zero padding before the crop
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = 64                   # per rank
    val_batch_size: int = 0                # per rank; 0 = batch_size
    workers: int = 2                       # decoding threads (DALI) / worker processes
    on_corrupt: str = "fail"               # fail (name the file) | skip (count and log it)
    prefetch: int = 2                      # DALI prefetch queue depth (batches ahead)
    pin_memory: Optional[bool] = None      # torchvision batches in pinned memory; null = with CUDA
    # Dataset layout: imagenet (ROOT/{train,val}/<class>/<image>) | cityscapes | voc
    layout: str = "imagenet"
    # Segmentation (task: segmentation): random rescale of the whole image by a factor in
    # scale_range (keeping its aspect ratio), then a crop_size [height, width] crop (image padded
    # 0, label padded 255) and a flip; photometric distortion optional.
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    photometric: bool = False
    voc_train_list: str = "train"          # VOC: ImageSets/Segmentation/<list>.txt


@dataclass
class SegmentationConfig:
    aux_weight: float = 0.4                # loss = CE(out) + aux_weight · CE(aux), ignore 255
    val_mode: str = "whole"                # whole (full image) | slide (crop windows)
    crop: list[int] = field(default_factory=lambda: [512, 1024])     # slide window [h, w]
    stride: list[int] = field(default_factory=lambda: [341, 682])    # slide step [h, w]


@dataclass
class ModelConfig:
    name: str = "cifar_resnet20"
    num_classes: int = 0                   # 0 = number of class folders in data.root/train
    opts: dict[str, Any] = field(default_factory=dict)   # structural options of build_model
    # segmentation: the backbone's starting weights, a classification final.pt of the same
    # method or a torchvision ResNet state_dict (.pth); null = random initialisation
    backbone_init: Optional[str] = None


@dataclass
class MethodConfig:
    name: str = "baseline"
    opts: dict[str, Any] = field(default_factory=dict)   # training options of the method


@dataclass
class OptimConfig:
    name: str = "sgd"                      # sgd | adamw
    lr: float = 0.1                        # at reference_batch (see below)
    reference_batch: int = 0               # >0: lr scales linearly with global batch / this
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False       # no weight decay on norm weights and biases
    # parameter-name prefix → learning-rate multiplier, e.g. {head: 10, aux_head: 10}
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    name: str = "cosine"                   # constant | step | multistep | cosine | poly
    epochs: int = 10
    # >0: the budget is this many optimizer steps instead of `epochs` (epochs then roll over
    # as the data runs out; warm-up and milestones stay in epochs, fractional allowed)
    iterations: int = 0
    warmup_epochs: float = 0.0             # linear warm-up from warmup_start × lr
    warmup_start: float = 0.0
    milestones: list[float] = field(default_factory=list)   # multistep, in epochs
    step_size: float = 30.0                # step, in epochs
    gamma: float = 0.1                     # step / multistep factor
    power: float = 0.9                     # poly
    min_lr: float = 0.0                    # cosine / poly floor


@dataclass
class EngineConfig:
    precision: str = "fp32"                # fp32 | bf16 | fp16 (torch autocast)
    zero_stage: int = 0                    # 0 | 1 | 2
    grad_accum: int = 1
    grad_clip: float = 0.0                 # max global grad norm; 0 = off
    label_smoothing: float = 0.0
    sync_bn: Optional[bool] = False        # nn.SyncBatchNorm (CUDA only); null = with CUDA
                                           # and more than one rank
    seed: int = 0
    eval_every: int = 1                    # epochs
    eval_every_iterations: int = 0         # >0: evaluate every this many optimizer steps
    sync_every: int = 50                   # optimizer steps between host reads of the loop's
                                           # device values (stop vote, metrics): a stop request
                                           # is honoured within this many steps
    channels_last: Optional[bool] = None   # NHWC memory format; null = on with CUDA
    compile: bool = False                  # torch.compile the model in place: baseline, csg and
                                           # gated; not selectconv or ce (README, Engine)
    log_every: int = 10                    # steps between train-metric logs
    max_steps_per_epoch: int = 0           # >0: truncate epochs (smoke runs)
    inhibited_threshold: float = 1e-2      # inhibited-channel diagnostic: mean post-ReLU below


@dataclass
class CheckpointConfig:
    dir: str = ""                          # "" = runs/<run name>/checkpoints
    every_minutes: float = 30.0            # also checkpoint mid-epoch this often; 0 = off
    every_iterations: int = 0              # >0: also checkpoint every this many optimizer steps
    keep_last: int = 2
    resume: str = "auto"                   # auto (latest in dir, if any) | none | <tag dir>
    allow_changes: list[str] = field(default_factory=list)  # config keys a resume may change


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "pipeline"
    run_name: str = ""                     # "" = config file stem
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    task: str = "classification"           # classification | segmentation
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs"
    name: str = ""                         # run name; "" = config file stem


CHOICES = {
    "task": ("classification", "segmentation"),
    "data.layout": ("imagenet", "cityscapes", "voc"),
    "segmentation.val_mode": ("whole", "slide"),
    "data.backend": ("dali", "torchvision"),
    "data.recipe": ("imagenet", "cifar"),
    "data.on_corrupt": ("fail", "skip"),
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("constant", "step", "multistep", "cosine", "poly"),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "engine.zero_stage": (0, 1, 2),
}


# Numbers the loop would run with and mislead (an untrained "final" model, a division by zero
# deep in the loop, a checkpoint folder never pruned): key → (lowest, whether lowest itself is
# allowed). A list or mapping value is checked element by element.
RANGES: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(("data.image_size", "data.batch_size", "data.prefetch", "data.std",
                     "data.scale", "data.ratio", "data.crop_size", "data.scale_range",
                     "optim.lr", "optim.lr_mult", "schedule.epochs", "schedule.step_size",
                     "engine.grad_accum", "engine.eval_every", "engine.sync_every",
                     "engine.log_every", "checkpoint.keep_last", "segmentation.crop",
                     "segmentation.stride"), (0, False)),
    **dict.fromkeys(("data.val_batch_size", "data.workers", "data.pad", "model.num_classes",
                     "optim.reference_batch", "optim.momentum", "optim.betas",
                     "optim.weight_decay", "schedule.iterations", "schedule.warmup_epochs",
                     "schedule.warmup_start", "schedule.milestones", "schedule.gamma", "schedule.power",
                     "schedule.min_lr", "engine.grad_clip", "engine.label_smoothing",
                     "engine.eval_every_iterations", "engine.max_steps_per_epoch",
                     "engine.inhibited_threshold", "checkpoint.every_minutes",
                     "checkpoint.every_iterations", "segmentation.aux_weight"), (0, True)),
}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config defaults form a cycle at {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml's own errors are several lines long
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    defaults = node.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    parts = [_read_yaml((path.parent / d).resolve(), seen + (path,)) for d in defaults]
    return OmegaConf.merge(*parts, node) if parts else node


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "not in" in first and key:
        return f"unknown config key '{key}'"
    return f"config key '{key}': {first}" if key else first


def _check_sections(node: DictConfig, schema: type = Config, prefix: str = "") -> None:
    """A section of the schema (``model``, ``data``, …) given as a scalar, e.g. ``model:
    resnet50``: name the key and the form expected (OmegaConf's message names neither)."""
    for f in fields(schema):
        if f.name not in node or not is_dataclass(f.default_factory):
            continue
        value = node[f.name]  # a section: a mapping, or null
        if value is not None and not isinstance(value, DictConfig):
            first = next(iter(fields(f.default_factory))).name
            raise ConfigError(f"config key '{prefix}{f.name}': expected a mapping of its keys "
                              f"(e.g. {f.name}: {{{first}: …}}), got {value!r}")
        if value is not None:
            _check_sections(value, f.default_factory, f"{prefix}{f.name}.")


def _check_ranges(cfg: DictConfig) -> None:
    for key, (low, inclusive) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        several = isinstance(value, (list, dict))
        values = list(value.values()) if isinstance(value, dict) else value if several else [value]
        if any(v < low or (v == low and not inclusive) for v in values):
            bound = f"{'every value ' if several else ''}{'>=' if inclusive else '>'} {low}"
            raise ConfigError(f"config key '{key}': expected {bound}, got {value!r}")


def _check_model_and_method(cfg: DictConfig) -> None:
    """The method and model exist, support each other and take the options given, with their
    types; the method's own value checks run (constructing it is cheap)."""
    from pipeline.methods import get_method, method_options
    from pipeline.models.registry import check_model_options, model_options

    for key, options, args in (("method.name", method_options, (cfg.method.name,)),
                               ("model.name", model_options, (cfg.model.name, cfg.method.name))):
        try:
            options(*args)
        except ConfigError as err:  # unknown, or not supported by the method
            raise ConfigError(f"config key '{key}': {err}") from None
    check_model_options(cfg.model.name, cfg.method.name, cfg.model.opts)
    get_method(cfg.method.name, **cfg.method.opts)
    if cfg.model.backbone_init and cfg.task != "segmentation":
        raise ConfigError("config key 'model.backbone_init': a segmentation backbone's starting "
                          "weights (task: segmentation), not of a classifier")


def _validated(node: DictConfig, overrides: Sequence[str], name: str) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
        for part in (node, dotlist):
            _check_sections(part)
        merged = OmegaConf.merge(OmegaConf.structured(Config), node, dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
    _check_ranges(merged)
    _check_model_and_method(merged)
    if not merged.name:
        merged.name = name
    OmegaConf.set_readonly(merged, True)
    return merged


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated config of file ``path`` with ``key=value`` overrides applied."""
    path = Path(path).resolve()
    name = path.stem if path.parent.name in ("", "configs") else f"{path.parent.name}-{path.stem}"
    return _validated(_read_yaml(path), overrides, name)


def load_config_dict(data: Mapping, overrides: Sequence[str] = (), name: str = "config"
                     ) -> DictConfig:
    """The validated config of ``data`` (a saved config, e.g. a checkpoint's) with ``key=value``
    overrides applied; ``name`` is the run name when ``data`` has none."""
    try:
        node = OmegaConf.create(dict(data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"not a config mapping ({_one_line(err)})") from None
    return _validated(node, overrides, name)


def _type_name(annotation: Any) -> str:
    """``int | None`` → "an integer or null" (the words of a config file)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    origin = typing.get_origin(annotation) or annotation
    return names.get(annotation) or f"a {getattr(origin, '__name__', origin)}"


def _fits(value: Any, annotation: Any) -> bool:
    if annotation in (inspect.Parameter.empty, Any):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation) or annotation
    return isinstance(value, origin) if isinstance(origin, type) else True


def declared_options(fn: Callable, skip: Sequence[str] = ()) -> dict[str, inspect.Parameter]:
    """The keyword options ``fn`` takes, by name, with their annotations resolved."""
    parameters = inspect.signature(fn, eval_str=True).parameters.values()
    return {p.name: p for p in parameters if p.name not in skip and
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(declared: Mapping[str, inspect.Parameter], opts: Mapping[str, Any], key: str,
                  owner: str) -> None:
    """Every entry of ``opts`` (config key ``key``, e.g. ``method.opts``) is one of
    ``owner``'s ``declared`` options, of its annotated type; else a ConfigError naming it."""
    if OmegaConf.is_config(opts):
        opts = OmegaConf.to_container(opts, resolve=True)
    for name, value in opts.items():
        if name not in declared:
            raise ConfigError(f"unknown {key.split('.')[0]} option {name!r} of {owner} (config "
                              f"key '{key}.{name}'; accepted: {', '.join(declared) or 'none'})")
        annotation = declared[name].annotation
        if not _fits(value, annotation):
            raise ConfigError(f"config key '{key}.{name}': expected {_type_name(annotation)}, "
                              f"got {value!r}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.1, …}``: the config as MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            if not node and prefix:
                out[prefix] = "{}"
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out
