"""The one typed config schema, loaded, composed and validated once at the edge.

A YAML file may list ``defaults:`` (paths relative to itself) that are merged first, in order;
then the file itself; then ``key=value`` overrides from the command line. The result is
merged onto the structured schema below, so an unknown key or a value of the wrong type is a
``ConfigError`` that names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
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
    sync_bn: bool = False                  # nn.SyncBatchNorm (CUDA only)
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


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """The validated config of file ``path`` with ``key=value`` overrides applied."""
    path = Path(path).resolve()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), _read_yaml(path),
                                 OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
    if not merged.name:
        merged.name = path.stem if path.parent.name in ("", "configs") else \
            f"{path.parent.name}-{path.stem}"
    OmegaConf.set_readonly(merged, True)
    return merged


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
