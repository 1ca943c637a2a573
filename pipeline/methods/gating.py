"""Conditional channel gating with batch-shaping (Bejnordi, Blankevoort, Welling, ICLR 2020).

**Gated residual block.** A gate module reads the block input ``x`` and gives one binary gate
per output channel of the gated conv; the gate multiplies that conv's output after BN + ReLU:

    h = ReLU(BN1(conv1(x))) ⊙ g(x);   out = ReLU(BN2(conv2(h)) + shortcut(x))

``GatedResidualBlock`` runs any chain of conv-BN ``stages()`` (ReLU between them) with a
``ChannelGate`` after the stages listed in ``gates``; shortcuts are never gated.

**Gate module** (``ChannelGate``): a = fc2(ReLU(BN(fc1(avgpool(x))))), fc1 without bias,
``hidden`` = 16 units. In training, binary concrete with a straight-through gradient
(``binary_concrete``): u ~ U(0, 1) per image and gate,

    y = (a + log u − log(1 − u)) / τ,  τ = 2/3;   forward g = 1[y > 0],  backward ∂g/∂y = σ'(y)

so that P(g = 1) = σ(a). At inference g = 1[a > 0], deterministic per image, so the closed
channels of the gated conv's output and of the next conv's input can be skipped
(``SkippingBlock``, produced by ``GatedChannels.export``).

**Batch-shaping loss** (``batch_shaping.py``): the Cramér–von Mises distance L_bs of each gate's
batch of p = σ(a) to the prior Beta(prior_a, prior_b) = Beta(0.6, 0.4).

**L0 loss** (``l0_loss``): mean of σ(a) over images, gates and layers.

**Total loss:** CE + γ(e)·L_bs + λ(e)·L0 with the epoch schedules (``GatedChannels``)

    γ(e) = gamma · max(0, 1 − e / gamma_end_epoch)
    λ(e) = lambda_max · clip((e − lambda_start_epoch) / (lambda_end_epoch − lambda_start_epoch), 0, 1)

(defaults: the CIFAR schedule, γ 0.75 → 0 at epoch 100; λ 0 until 100, ramp to λ_max at 300).

**Compute** (``GatedComputeMeter``): a conv costs out_H·out_W·C_out·C_in·k² MACs per image; with
gates its per-image cost is that times (open inputs / C_in)·(open outputs / C_out). Static MACs
have every gate open; dynamic MACs are averaged over the evaluation set; ungated convs, linear
layers and the gate modules count in full.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError

from . import register_method
from .base import Method
from .batch_shaping import BetaCDF, batch_shaping_loss

TAU = 2.0 / 3.0


def binary_concrete(logits: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Hard 0/1 gates with P(g = 1) = σ(logits), straight-through gradient of σ(y)."""
    eps = torch.finfo(logits.dtype).eps  # keeps log u − log(1 − u) finite
    y = (logits + torch.logit(torch.rand_like(logits), eps)) / tau
    soft = torch.sigmoid(y)
    # In this order the forward value is exactly 0 or 1 (1 − s and −s are exact for s ≥ 1/2
    # and s ≤ 1/2 respectively).
    return soft + ((y > 0).to(logits.dtype) - soft).detach()


class ChannelGate(nn.Module):
    """avgpool → FC(no bias) → BN → ReLU → FC(bias) = logits a; gates from a (see module doc).

    The logits of the last forward are kept in ``logits`` for the losses of the step.
    """

    def __init__(self, in_channels: int, gated_channels: int, hidden: int = 16,
                 init_bias: float = 2.0, tau: float = TAU):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, gated_channels)
        # Start with most gates open (P = σ(2) ≈ 0.88) so early training sees the dense net.
        nn.init.constant_(self.fc2.bias, init_bias)
        self.tau = tau
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc2(F.relu(self.bn(self.fc1(x.mean((2, 3))))))
        self.logits = a
        if self.training:
            return binary_concrete(a, self.tau)
        return (a > 0).to(a.dtype)


Stage = tuple[nn.Conv2d, nn.BatchNorm2d]


class GatedResidualBlock(nn.Module):
    """Mixin for a residual block whose branch is conv-BN stages with ReLU between them.

    A concrete block names its (conv, BN) stages in ``stage_names`` (torchvision's basic block
    by default), has a ``downsample`` (None for identity) and calls ``add_gates`` once;
    ``gates[str(k)]`` gates the output channels of stage k.
    """

    stage_names: tuple[tuple[str, str], ...] = (("conv1", "bn1"), ("conv2", "bn2"))

    def stages(self) -> list[Stage]:
        return [(getattr(self, conv), getattr(self, bn)) for conv, bn in self.stage_names]

    def add_gates(self, in_channels: int, gated_stages: Sequence[int], hidden: int) -> None:
        stages = self.stages()
        if any(not 0 <= k < len(stages) - 1 for k in gated_stages):
            raise ValueError(f"gated stages {list(gated_stages)}: the last stage is never gated")
        self.gates = nn.ModuleDict({str(k): ChannelGate(in_channels, stages[k][0].out_channels,
                                                        hidden) for k in gated_stages})

    def stage_gates(self) -> list[ChannelGate | None]:
        """The gate of each stage's output (None for ungated stages and the last one)."""
        return [self.gates[str(k)] if str(k) in self.gates else None
                for k in range(len(self.stages()) - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        masks = [None if gate is None else gate(x) for gate in self.stage_gates()]
        h = x
        for k, (conv, bn) in enumerate(self.stages()):
            h = bn(conv(h))
            if k < len(masks):
                h = F.relu(h)
                if masks[k] is not None:
                    h = h * masks[k][:, :, None, None]
        return F.relu(h + identity)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv followed by eval-mode BN as one conv."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


class SkippingBlock(nn.Module):
    """Inference form of a ``GatedResidualBlock`` that computes only the open channels.

    BN is folded into each conv; per image, the rows of a gated conv's folded weight and the
    input columns of the next conv's weight are selected with the open channel indices, so
    closed channels cost nothing. Same outputs as the masked eval-mode block.
    """

    def __init__(self, block: GatedResidualBlock):
        super().__init__()
        stages = block.stages()
        for conv, _ in stages:
            if conv.groups != 1 or isinstance(conv.padding, str):
                raise ValueError(f"skipping inference needs groups=1 and numeric padding, "
                                 f"got {conv}")
        self.geometry = [(conv.stride, conv.padding, conv.dilation) for conv, _ in stages]
        with torch.no_grad():
            for k, (conv, bn) in enumerate(stages):
                weight, bias = _fold_bn(conv, bn)
                self.register_buffer(f"weight{k}", weight.detach().clone())
                self.register_buffer(f"bias{k}", bias.detach().clone())
        self.gates = block.gates
        self.gated = [gate is not None for gate in block.stage_gates()]
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        opens = [self.gates[str(k)](x) > 0 if gated else None for k, gated in enumerate(self.gated)]
        branch = [self._branch(x[n:n + 1], [None if o is None else o[n] for o in opens])
                  for n in range(x.shape[0])]
        return F.relu(torch.cat(branch) + identity)

    def _branch(self, h: torch.Tensor, opens: list[torch.Tensor | None]) -> torch.Tensor:
        previous = None  # open input channels of the current stage (None: all)
        for k, (stride, padding, dilation) in enumerate(self.geometry):
            weight, bias = getattr(self, f"weight{k}"), getattr(self, f"bias{k}")
            if previous is not None:
                weight = weight.index_select(1, previous)
            current = None
            if k < len(opens) and opens[k] is not None:
                current = opens[k].nonzero().flatten()
                if current.numel() == 0:
                    # Every channel closed: one zero channel keeps the shapes valid.
                    current = current.new_zeros(1)
                    weight, bias = weight[:1] * 0, bias[:1] * 0
                else:
                    weight, bias = weight.index_select(0, current), bias.index_select(0, current)
            h = F.conv2d(h, weight, bias, stride, padding, dilation)
            if k < len(self.geometry) - 1:
                h = F.relu(h)
            previous = current
        return h


def to_skipping(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every gated block replaced by its skipping form."""
    for gate in model.modules():
        if isinstance(gate, ChannelGate):
            gate.logits = None  # the last training batch's graph is no part of the model
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, GatedResidualBlock):
                setattr(parent, name, SkippingBlock(child))
    return model


def l0_loss(p: torch.Tensor) -> torch.Tensor:
    return p.float().mean()


def gate_probabilities(model: nn.Module) -> torch.Tensor | None:
    """σ(a) of the last forward's gates, all layers side by side: (N, total gates)."""
    logits = [m.logits for m in model.modules() if isinstance(m, ChannelGate)
              and m.logits is not None]
    return torch.sigmoid(torch.cat(logits, 1)) if logits else None


def _ramp(epoch: float, start: float, end: float) -> float:
    """0 before ``start``, 1 after ``end``, linear between."""
    if epoch >= end:
        return 1.0
    return max(0.0, (epoch - start) / (end - start))


class GatedComputeMeter:
    """Static and dynamic MACs per image, per-layer open fractions, gate behaviour shares."""

    def __init__(self) -> None:
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        self.detach()
        names = {m: name for name, m in model.named_modules()}
        self.gates = [m for m in model.modules() if isinstance(m, ChannelGate)]
        links: dict[nn.Module, tuple[ChannelGate | None, ChannelGate | None]] = {}
        labels: dict[ChannelGate, str] = {}
        for block in model.modules():
            if isinstance(block, GatedResidualBlock):
                gates = block.stage_gates()
                for k, (conv, _) in enumerate(block.stages()):
                    links[conv] = (gates[k - 1] if k > 0 else None,
                                   gates[k] if k < len(gates) else None)
                    if k < len(gates) and gates[k] is not None:
                        labels[gates[k]] = names[conv]
        self.gate_names = [labels.get(g, names[g]) for g in self.gates]
        self._outputs: dict[ChannelGate, torch.Tensor] = {}
        self._static = 0.0        # python float: exact for the per-image constants summed
        self._dynamic_ungated = 0.0
        self._dynamic_gated: torch.Tensor | None = None
        self._on: dict[ChannelGate, torch.Tensor] = {}
        self._images = 0
        self._handles.append(model.register_forward_pre_hook(self._count_images))
        for gate in self.gates:
            self._handles.append(gate.register_forward_hook(self._record_gate))
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hook = self._conv_hook(*links.get(m, (None, None)))
                self._handles.append(m.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _count_images(self, module: nn.Module, args: tuple) -> None:
        self._images += args[0].shape[0]

    def _record_gate(self, gate: nn.Module, args: tuple, out: torch.Tensor) -> None:
        g = out.detach()
        self._outputs[gate] = g
        count = g.sum(0, dtype=torch.float64)
        self._on[gate] = count if gate not in self._on else self._on[gate] + count

    def _conv_hook(self, in_gate: ChannelGate | None, out_gate: ChannelGate | None):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            n = out.shape[0]
            if isinstance(module, nn.Conv2d):
                per_image = out[0].numel() * module.weight[0].numel()   # C_in/groups · k²
            else:
                per_image = out[0].numel() * module.in_features
            self._static += per_image * n
            if in_gate is None and out_gate is None:
                self._dynamic_ungated += per_image * n
                return
            fraction = torch.ones(n, dtype=torch.float64, device=out.device)
            for gate in (in_gate, out_gate):
                if gate is not None:
                    fraction = fraction * self._outputs[gate].double().mean(1)
            cost = per_image * fraction.sum()
            self._dynamic_gated = cost if self._dynamic_gated is None \
                else self._dynamic_gated + cost
        return hook

    def sums(self) -> dict[str, torch.Tensor]:
        device = self._dynamic_gated.device if self._dynamic_gated is not None else None
        # filled on the device: torch.tensor(v, device=…) would be a blocking host copy
        scalar = lambda v: torch.full((), float(v), dtype=torch.float64, device=device)  # noqa: E731
        gated = self._dynamic_gated if self._dynamic_gated is not None else scalar(0)
        on = [self._on.get(g, torch.zeros(g.fc2.out_features, dtype=torch.float64,
                                          device=device)) for g in self.gates]
        return {"images": scalar(self._images), "static_macs": scalar(self._static),
                "dynamic_macs": gated + self._dynamic_ungated,
                "gate_on": torch.cat(on).to(device) if on else scalar(0).reshape(0)}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        images = max(float(sums["images"]), 1.0)
        static, dynamic = float(sums["static_macs"]), float(sums["dynamic_macs"])
        on = sums["gate_on"].cpu()
        out = {"macs": static / images, "dynamic_macs": dynamic / images,
               "dynamic_macs_ratio": dynamic / static if static else 1.0,
               "gates_always_on": float((on == images).double().mean()) if on.numel() else 0.0,
               "gates_always_off": float((on == 0).double().mean()) if on.numel() else 0.0}
        out["gates_conditional"] = 1.0 - out["gates_always_on"] - out["gates_always_off"] \
            if on.numel() else 0.0
        start = 0
        for gate, name in zip(self.gates, self.gate_names):
            width = gate.fc2.out_features
            out[f"open/{name}"] = float(on[start:start + width].sum()) / (images * width)
            start += width
        return out


@register_method
class GatedChannels(Method):
    """Training hooks of channel gating: the scheduled losses, gate groups, compute meter."""

    name = "gated"
    final_keys = ("macs", "dynamic_macs")

    def __init__(self, gamma: float = 0.75, gamma_end_epoch: float = 100.0,
                 lambda_max: float = 0.1, lambda_start_epoch: float = 100.0,
                 lambda_end_epoch: float = 300.0, prior_a: float = 0.6, prior_b: float = 0.4,
                 pdf_min: float = 1e-3, pdf_max: float = 100.0,
                 gate_weight_decay: float = 0.0):
        checks = {"gamma": (gamma >= 0, "a number >= 0"),
                  "gamma_end_epoch": (gamma_end_epoch > 0, "an epoch > 0"),
                  "lambda_max": (lambda_max >= 0, "a number >= 0"),
                  "lambda_start_epoch": (lambda_start_epoch >= 0, "an epoch >= 0"),
                  "lambda_end_epoch": (lambda_end_epoch > lambda_start_epoch,
                                       "an epoch > lambda_start_epoch"),
                  "prior_a": (prior_a > 0, "a number > 0"),
                  "prior_b": (prior_b > 0, "a number > 0"),
                  "pdf_min": (0 < pdf_min < pdf_max, "0 < pdf_min < pdf_max"),
                  "gate_weight_decay": (gate_weight_decay >= 0, "a number >= 0")}
        for option, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"method.opts.{option}: expected {expected}")
        self.gamma, self.gamma_end_epoch = gamma, gamma_end_epoch
        self.lambda_max = lambda_max
        self.lambda_start_epoch, self.lambda_end_epoch = lambda_start_epoch, lambda_end_epoch
        self.prior = BetaCDF(prior_a, prior_b)
        self.pdf_min, self.pdf_max = pdf_min, pdf_max
        self.gate_weight_decay = gate_weight_decay

    def gamma_at(self, epoch: float) -> float:
        return self.gamma * (1.0 - _ramp(epoch, 0.0, self.gamma_end_epoch))

    def lambda_at(self, epoch: float) -> float:
        return self.lambda_max * _ramp(epoch, self.lambda_start_epoch, self.lambda_end_epoch)

    def param_groups(self, model: nn.Module) -> list[dict]:
        params = [p for m in model.modules() if isinstance(m, ChannelGate)
                  for p in m.parameters()]
        return [{"params": params, "weight_decay": self.gate_weight_decay}] if params else []

    def extra_losses(self, model: nn.Module, epoch: float) -> dict[str, torch.Tensor]:
        p = gate_probabilities(model)
        if p is None:
            return {}
        gamma, lam = self.gamma_at(epoch), self.lambda_at(epoch)
        zero = p.new_zeros(())
        shaping = gamma * batch_shaping_loss(p, self.prior, self.pdf_min, self.pdf_max) \
            if gamma > 0 else zero
        return {"batch_shaping": shaping, "l0": lam * l0_loss(p) if lam > 0 else zero}

    def eval_meters(self, model: nn.Module) -> list[GatedComputeMeter]:
        return [GatedComputeMeter()]

    def export(self, model: nn.Module) -> nn.Module:
        return to_skipping(model)
