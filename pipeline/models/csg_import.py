"""The CSG authors' released CIFAR-10 checkpoints as our models.

Omidvar et al. publish CIFAR-10 weights beside their code (github hamedomidvar/associativeconv,
``Pretrained_Models/``, MIT): each file is ``torch.save({"net": state_dict, "acc": test accuracy
in %, "epoch": int})`` of a ``DataParallel`` model, some in fp16. ``convert`` loads one into our
model of the same architecture:

- ``module.`` prefixes dropped, fp16 → fp32, names mapped per architecture (``LAYOUTS``);
- the generator (``CSG.weight``, ``CLG.weight`` in their 2019 code) is registered on the model and
  again on every block that uses it, so the file holds one copy per block beside the top one: the
  copies must be equal (a file where they are not is refused, naming the copy) and become our
  single ``csg.weight``;
- their DenseNet layer concatenates [new, x], ours [x, new]: every layer that reads a
  concatenation (the next dense layer's 1×1 unit, the transition, the head) gets its input
  channels (BN entries, conv and fc columns) re-indexed to our order, which is exact;
- their option-A shortcut (``DownsampleA``: cat(x, x·0)) is ours (``cifar_resnet``).

Architectures: their CIFAR ResNets → ``cifar_resnet<depth>``, DenseNet-BC-40-k →
``cifar_densenet_bc_40_<k>``, ShuffleNetV2 0.5× → ``cifar_shufflenet_v2_x0_5``; each with method
csg when the file holds a generator, else baseline. The CSG options (slice, code) are the model
option defaults unless given; a file whose shapes do not fit the model is refused naming the key.
Their evaluation normalises with ``AUTHORS_MEAN`` / ``AUTHORS_STD`` (their main.py).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError

from .cifar_densenet import CIFAR_DENSENETS, DenseLayer
from .cifar_resnet import CIFAR_RESNET_DEPTHS
from .registry import build_model

AUTHORS_MEAN = (0.4914, 0.4822, 0.4465)
AUTHORS_STD = (0.2023, 0.1994, 0.2010)

Rule = tuple[str, str | Callable[[re.Match], str]]

_RESNET: list[Rule] = [
    (r"conv_1_3x3\.(.+)", r"conv1.\1"),
    (r"bn_1\.(.+)", r"bn1.\1"),
    (r"stage_(\d)\.(\d+)\.conv_a\.weight", r"layer\1.\2.conv1.weight"),
    (r"stage_(\d)\.(\d+)\.conv_b\.weight", r"layer\1.\2.conv2.weight"),
    (r"stage_(\d)\.(\d+)\.code", r"layer\1.\2.conv1.codes"),
    (r"stage_(\d)\.(\d+)\.code2", r"layer\1.\2.conv2.codes"),
    (r"stage_(\d)\.(\d+)\.bn_a\.(.+)", r"layer\1.\2.bn1.\3"),
    (r"stage_(\d)\.(\d+)\.bn_b\.(.+)", r"layer\1.\2.bn2.\3"),
    (r"classifier\.(.+)", r"fc.\1"),
]

# their dense block b / transition b → our index in model.features
_DENSE_BLOCK = {"1": 0, "2": 2, "3": 4}
_TRANSITION = {"1": 1, "2": 3}
_DENSE_LAYER = {"bn1": "unit1.norm", "conv1": "unit1.conv", "bn2": "unit2.norm",
                "conv2": "unit2.conv"}
_DENSENET: list[Rule] = [
    (r"conv1\.weight", "conv1.weight"),
    (r"dense([123])\.(\d+)\.(bn1|conv1|bn2|conv2)\.(.+)",
     lambda m: f"features.{_DENSE_BLOCK[m[1]]}.{m[2]}.{_DENSE_LAYER[m[3]]}.{m[4]}"),
    (r"dense([123])\.(\d+)\.code2",
     lambda m: f"features.{_DENSE_BLOCK[m[1]]}.{m[2]}.unit2.conv.codes"),
    (r"trans([12])\.(bn|conv)\.(.+)",
     lambda m: f"features.{_TRANSITION[m[1]]}.0.{'norm' if m[2] == 'bn' else 'conv'}.{m[3]}"),
    (r"trans3\.bn\.(.+)", r"norm.\1"),
    (r"linear\.(.+)", r"fc.\1"),
]

# ShuffleNetV2 units: their flat names → our branches (nn.Sequential indices; ReLUs between)
_DOWN_UNIT = {"conv1": "left.0", "bn1": "left.1", "conv2": "left.2", "bn2": "left.3",
              "conv3": "right.0", "bn3": "right.1", "conv4": "right.3", "bn4": "right.4",
              "conv5": "right.5", "bn5": "right.6"}
_BASIC_UNIT = {"conv1": "branch.0", "bn1": "branch.1", "conv2": "branch.3", "bn2": "branch.4",
               "conv3": "branch.5", "bn3": "branch.6"}
_SHUFFLENET: list[Rule] = [
    (r"(conv1|bn1|conv2|bn2)\.(.+)", r"\1.\2"),
    (r"code2", "conv2.codes"),
    (r"layer([123])\.0\.((?:conv|bn)[1-5])\.(.+)",
     lambda m: f"layer{m[1]}.0.{_DOWN_UNIT[m[2]]}.{m[3]}"),
    (r"layer([123])\.(\d+)\.((?:conv|bn)[1-3])\.(.+)",
     lambda m: f"layer{m[1]}.{m[2]}.{_BASIC_UNIT[m[3]]}.{m[4]}"),
    (r"linear\.(.+)", r"fc.\1"),
]


def concat_order(in_channels: int, growth: int, layers: int) -> torch.Tensor:
    """Where our channel k of a dense block's concatenation after ``layers`` layers is in
    theirs: ours is [x, y1, …, yn] (x the block input), theirs [yn, …, y1, x]."""
    k = torch.arange(in_channels + layers * growth)
    new = (k - in_channels).clamp(min=0)
    layer = new.div(growth, rounding_mode="floor") + 1
    return torch.where(k < in_channels, layers * growth + k,
                       (layers - layer) * growth + new % growth)


def _dense_readers(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(BN key prefix, conv/fc key prefix, concat order) of every layer reading a concatenation:
    each dense layer's first unit, the transition after a block, or the head after the last."""
    readers = []
    features = list(model.features)
    for index, block in enumerate(features):
        if not isinstance(block[0], DenseLayer):
            continue
        in_channels = block[0].unit1.norm.num_features
        growth = block[0].unit2.conv.out_channels
        for i in range(len(block)):
            unit = f"features.{index}.{i}.unit1"
            readers.append((f"{unit}.norm", f"{unit}.conv", concat_order(in_channels, growth, i)))
        after = concat_order(in_channels, growth, len(block))
        transition = f"features.{index + 1}.0"
        readers.append((f"{transition}.norm", f"{transition}.conv", after)
                       if index + 1 < len(features) else ("norm", "fc", after))
    return readers


def reorder_dense_inputs(state: dict[str, tuple[str, torch.Tensor]], model: nn.Module) -> None:
    """Their concatenation order → ours, on every reader's BN entries and weight columns."""
    for norm, consumer, order in _dense_readers(model):
        for name in ("weight", "bias", "running_mean", "running_var"):
            key, tensor = state[f"{norm}.{name}"]
            state[f"{norm}.{name}"] = (key, tensor[order])
        key, weight = state[f"{consumer}.weight"]
        state[f"{consumer}.weight"] = (key, weight[:, order])


@dataclass(frozen=True)
class Layout:
    """How the authors' state_dict of an architecture becomes ours: key renaming rules, and the
    re-indexing of channels their layers order differently (on {our key: (their key, tensor)})."""
    rules: list[Rule]
    reorder: Callable[[dict, nn.Module], None] | None = None


LAYOUTS: dict[str, Layout] = {
    **{f"cifar_resnet{depth}": Layout(_RESNET) for depth in CIFAR_RESNET_DEPTHS},
    **{name: Layout(_DENSENET, reorder_dense_inputs)
       for name, (_, _, compression) in CIFAR_DENSENETS.items() if compression == 0.5},
    "cifar_shufflenet_v2_x0_5": Layout(_SHUFFLENET),
}

GENERATOR_NAMES = ("CSG", "CLG")


@dataclass
class Imported:
    model: nn.Module
    method: str                  # csg | baseline
    opts: dict                   # the model options it was built with (CSG: slice and code)
    num_classes: int
    generator_copies: int        # copies of the generator in the file, all equal
    source_dtype: str            # of the file's floating-point tensors
    authors_accuracy: float      # their CIFAR-10 test accuracy, in %
    epoch: int


def load_released(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's state_dict with ``module.`` dropped, and the file itself."""
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not a torch checkpoint of tensors ({first})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("net"), dict):
        raise InputError(f"{path}: expected the authors' form {{'net': state_dict, 'acc', "
                         f"'epoch'}}")
    return {k.removeprefix("module."): v for k, v in saved["net"].items()}, saved


def _is_generator(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in GENERATOR_NAMES and parts[-1] == "weight"


def collapse_generator(state: dict[str, torch.Tensor], path: Path
                       ) -> tuple[str, torch.Tensor | None, int]:
    """The generator's key and tensor (the top-level copy, else the first) and the number of
    copies; every copy must be equal to it. Removes the copies from ``state``."""
    keys = [k for k in state if _is_generator(k)]
    if not keys:
        return "", None, 0
    top = [k for k in keys if "." not in k.removesuffix(".weight")]
    reference = (top or keys)[0]
    generator = state[reference]
    for key in keys:
        if not torch.equal(state[key], generator):
            delta = (state[key].double() - generator.double()).abs().max().item()
            raise InputError(f"{path}: generator copy module.{key} differs from "
                             f"module.{reference} (max |Δ| {delta:.3g}): which one the blocks "
                             f"used is undefined")
    for key in keys:
        del state[key]
    return reference, generator, len(keys)


def rename(state: dict[str, torch.Tensor], rules: list[Rule], model_name: str,
           path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """{our key: (their key, tensor)} by the first rule whose pattern matches the whole key."""
    out = {}
    for key, tensor in state.items():
        for pattern, target in rules:
            match = re.fullmatch(pattern, key)
            if match:
                ours = target(match) if callable(target) else match.expand(target)
                out[ours] = (key, tensor)
                break
        else:
            raise InputError(f"{path}: module.{key} has no counterpart in {model_name}")
    return out


def _classes(state: dict[str, tuple[str, torch.Tensor]], path: Path) -> int:
    if "fc.weight" not in state:
        raise InputError(f"{path}: no classifier weight in the checkpoint")
    return state["fc.weight"][1].shape[0]


def _check_fit(state: dict[str, tuple[str, torch.Tensor]], model: nn.Module, what: str,
               path: Path) -> None:
    expected = model.state_dict()
    for ours, (theirs, tensor) in state.items():
        if ours not in expected:
            raise InputError(f"{path}: module.{theirs} has no counterpart in {what}")
        if tensor.shape != expected[ours].shape:
            raise InputError(f"{path}: module.{theirs} has shape {tuple(tensor.shape)}, {what} "
                             f"expects {tuple(expected[ours].shape)} ({ours})")
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"{path}: no weights for {missing[0]} of {what} "
                         f"({len(missing)} missing)")


def convert(path: Path, model_name: str, opts: dict) -> Imported:
    """The released checkpoint ``path`` as our ``model_name`` (built with ``opts``)."""
    if model_name not in LAYOUTS:
        raise InputError(f"no mapping of the CSG authors' checkpoints to model {model_name!r} "
                         f"(expected one of {sorted(LAYOUTS)})")
    layout = LAYOUTS[model_name]
    raw, saved = load_released(path)
    floats = {str(t.dtype).removeprefix("torch.") for t in raw.values() if t.is_floating_point()}
    generator_key, generator, copies = collapse_generator(raw, path)
    # the generator first: where its shape does not fit, that is the error to name
    state = {} if generator is None else {"csg.weight": (generator_key, generator)}
    state.update(rename(raw, layout.rules, model_name, path))
    method = "csg" if generator is not None else "baseline"
    num_classes = _classes(state, path)
    try:
        model = build_model(model_name, num_classes, method=method, **opts)
    except InputError as err:
        held = "holds a generator" if generator is not None else "holds no generator"
        raise InputError(f"{path} {held} (method {method}): {err}") from None
    if method == "csg":
        opts = {"slice": model.csg.slice_size, "code": model.csg.code_size, **opts}
    what = f"{model_name} ({method}{''.join(f', {k}={v}' for k, v in opts.items())})"
    _check_fit(state, model, what, path)
    if layout.reorder is not None:
        layout.reorder(state, model)
    model.load_state_dict({k: t.float() if t.is_floating_point() else t
                           for k, (_, t) in state.items()})
    return Imported(model, method, opts, num_classes, copies, "/".join(sorted(floats)),
                    float(saved.get("acc", float("nan"))), int(saved.get("epoch", -1)))
