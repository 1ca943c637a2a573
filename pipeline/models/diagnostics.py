"""Inhibited channels (Shao et al. 2020, §2): the fraction of channels whose mean post-ReLU
activation over the evaluation set is below a threshold, per stage and over the whole network.

Every call of every ``nn.ReLU`` / ``nn.ReLU6`` module on a 4-D feature map is a separate set of
channels, keyed ``<module name>#<call index within one forward>``: torchvision ResNet blocks call
one shared ``relu`` module two or three times per forward, on different tensors, so keying by
module alone would merge (and double-count) them. ReLUs on 2-D inputs (inside gates and MLPs)
are not feature-map channels and are skipped.

Stages: the first component of the name matching ``layerK``, ``stageK``, ``denseblockK`` or
``transitionK`` (torchvision ResNets and CIFAR ResNets, ShuffleNetV2, torchvision DenseNets);
otherwise the spatial size of the map, ``res<H>x<W>`` (the ResNet stem, MobileNetV2's
``features.i``, CIFAR DenseNets, any other network).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from pipeline.config import ConfigError

_STAGE = re.compile(r"^(layer|stage|denseblock|transition)\d+$")
_RELUS = (nn.ReLU, nn.ReLU6)


def stage_of(name: str, height: int, width: int) -> str:
    for part in name.split("."):
        if _STAGE.match(part):
            return part
    return f"res{height}x{width}"


class InhibitedChannels:
    """EvalMeter: per-channel sums of post-ReLU activations and element counts, reduced with SUM
    across ranks; ``summarize`` gives ``inhibited/all`` and ``inhibited/<stage>`` fractions."""

    def __init__(self, threshold: float = 1e-2):
        if threshold < 0:
            raise ConfigError(f"inhibited-channel threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        self._keys: list[str] = []            # "<relu name>#<call>", in first-forward order
        self._stages: dict[str, str] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self._reset()
        self._handles.append(model.register_forward_pre_hook(self._new_forward))
        for name, module in model.named_modules():
            if isinstance(module, _RELUS):
                name = name.removeprefix("module.")  # DeepSpeed / DDP wrappers
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _new_forward(self, module: nn.Module, args) -> None:
        self._calls = {}

    def _hook(self, name: str):
        def record(module: nn.Module, args, out: torch.Tensor) -> None:
            if out.dim() != 4:
                return
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = f"{name}#{call}"
            with torch.no_grad():
                channel_sums = out.sum((0, 2, 3), dtype=torch.float32).double()
            if key not in self._sums:
                self._keys.append(key)
                self._stages[key] = stage_of(name, out.shape[2], out.shape[3])
                self._sums[key] = torch.zeros_like(channel_sums)
                self._counts[key] = torch.zeros(1, dtype=torch.float64, device=out.device)
            self._sums[key] += channel_sums
            self._counts[key] += out.numel() // out.shape[1]

        return record

    def sums(self) -> dict[str, torch.Tensor]:
        """``channel_sums`` (all channels of all keys, concatenated) and ``counts`` (per key)."""
        if not self._keys:
            raise ValueError("InhibitedChannels.sums: no ReLU feature map was seen; attach the "
                             "meter to the model before evaluation")
        return {"channel_sums": torch.cat([self._sums[k] for k in self._keys]),
                "counts": torch.cat([self._counts[k] for k in self._keys])}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        channel_sums, counts = sums["channel_sums"].cpu(), sums["counts"].cpu()
        widths = [self._sums[k].numel() for k in self._keys]
        inhibited: dict[str, list[int]] = {"all": [0, 0]}
        for key, key_sums, count in zip(self._keys, channel_sums.split(widths), counts):
            below = int((key_sums / count < self.threshold).sum())
            for stage in ("all", self._stages[key]):
                totals = inhibited.setdefault(stage, [0, 0])
                totals[0] += below
                totals[1] += key_sums.numel()
        return {f"inhibited/{stage}": below / total
                for stage, (below, total) in inhibited.items()}


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of the batch ``x`` and return the model
    in eval mode: an untrained model then gives outputs of a trained model's scale (at
    initialisation eval-mode activations grow with depth, to inf and NaN in deep ResNets, which
    makes timings and comparisons meaningless)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                  # cumulative average: exactly this batch's statistics
    model.train()
    model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
