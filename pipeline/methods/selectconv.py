"""Selective convolution: channel de-allocation and re-allocation during training.

Jeong & Shin, "Training CNNs with Selective Allocation of Channels", ICML 2019.

A selective unit (``SelectiveConv2d``) replaces a pre-activation unit BN → ReLU → Conv whose
input has C channels. Besides the BN (γ = ``norm.weight``, β = ``norm.bias``) and the conv
(W = ``conv.weight``, [O, C, kh, kw]) it holds

    is_open[C]   0/1: closed input channels are multiplied by 0 after the ReLU,
    ptr[C]       −1, or for a re-allocated slot r the original channel ptr[r] it copies,
    shift[C, 2]  (x, y) translation of a copied slot (only when K > 0; weight decay 1e-5).

Forward, input x [N, C, H, W]:

    x[:, r] ← bilinear(x[:, ptr[r]], translated by shift[r] / ((H + W) / 4))   for ptr[r] ≥ 0
    y = conv(ReLU(BN(x)) · is_open)

(sampling with border padding, ``align_corners=True``). Because ReLU(z)·m = ReLU(z·m) for
m ∈ {0, 1}, the mask is folded into the BN affine (γ·m, β·m): the unit costs no more than a
plain BN → ReLU → Conv until some slot is a copy. The copy itself is ``copy_slots``
(``channel_copy.py``).

Expected channel damage, φ and Φ the standard normal pdf and cdf:

    E_i       = |γ_i| φ(β_i / (|γ_i| + 1e-8)) + β_i Φ(β_i / (|γ_i| + 1e-8)),  times is_open[i]
                (E_i = E[ReLU(Z)], Z ~ N(β_i, γ_i²): the mean input of channel i to the conv)
    ecdm[o,i] = (Σ_{kh,kw} W[o,i,kh,kw]) · E_i
    nrm[o,i]  = |ecdm[o,i]| / (Σ_j |ecdm[o,j]| + 1e-8)

``dealloc(γ_budget)``: sort channels by max_o nrm[o,i] ascending and close the longest prefix
whose cumulative nrm stays ≤ γ_budget for every output o; closed slots get ptr = −1.

``realloc(generator, n_max)`` (K > 0 only): score_i = ||nrm[:, i]||₂ (0 for closed channels and,
if n_max is set, for an original with more than n_max copies and for those copies). Every closed
slot d picks a source s uniformly among the top-K scores, reopens with W[:, d] = 0 (so the
network function is unchanged at that instant), takes s's BN weight, bias and running
statistics, shift[d] ~ U(−1.5, 1.5)², and ptr[d] = ptr[s] if ptr[s] ≥ 0 else s.

Schedule (``SelectConv.on_epoch_end``): after the evaluation of every epoch < 0.5 · epochs, on
every unit, dealloc then realloc. Units with K = 0 only prune (a closed channel never reopens):
``SelectConv.export`` removes their closed input channels physically, with the filters of the
unit just before them that produce those channels.

Distributed training: every input of the hook is identical on every rank (parameters, and BN
running statistics averaged by the engine before evaluation), and the random choices come from
a generator seeded by (seed, epoch), so every rank makes the same edits. Optimizer state of
re-initialised entries is kept as it is by default, as the authors' code does
(``reset_optimizer_state=True`` has the engine zero it under the returned masks).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError

from . import register_method
from .base import Method
from .channel_copy import copy_slots

SHIFT_INIT = 1.5       # a new copy's shift is drawn from U(−1.5, 1.5)² (in shift units)
EPS = 1e-8


def expected_relu(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """E[ReLU(Z)] for Z ~ N(β, γ²), elementwise: |γ| φ(β/|γ|) + β Φ(β/|γ|)."""
    scale = gamma.abs()
    ratio = beta / (scale + EPS)
    pdf = torch.exp(-0.5 * ratio ** 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(ratio / math.sqrt(2)))
    return scale * pdf + beta * cdf


class SelectiveConv2d(nn.Module):
    """BN → ReLU → ×is_open → Conv with copyable, translatable input slots (see module doc).

    ``K`` is structural: the number of top-scoring channels a free slot copies from (3), or 0
    for a unit that only prunes (it then has no ``shift``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, K: int,
                 stride: int = 1):
        super().__init__()
        if K < 0:
            raise ValueError(f"SelectiveConv2d K must be >= 0, got {K}")
        self.K = K
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.register_buffer("is_open", torch.ones(in_channels))
        self.register_buffer("ptr", torch.full((in_channels,), -1, dtype=torch.long))
        # Re-allocations so far (a diagnostic: how many channels have moved).
        self.register_buffer("moves", torch.zeros((), dtype=torch.long))
        self.shift = nn.Parameter(torch.zeros(in_channels, 2)) if K > 0 else None
        # The copied slots and their sources, kept beside ptr so that the forward neither scans
        # ptr (a device sync per unit on GPU) nor touches anything when there is no copy.
        self.register_buffer("copy_dst", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("copy_src", torch.zeros(0, dtype=torch.long), persistent=False)
        self.num_copies = 0
        # False forces the grid_sample copy on CPU too (the reference the kernels are tested on)
        self.fused_kernels = True
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    def refresh_copies(self) -> None:
        self.copy_dst = (self.ptr >= 0).nonzero().flatten()
        self.copy_src = self.ptr[self.copy_dst]
        self.num_copies = int(self.copy_dst.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_copies:
            H, W = x.shape[-2:]
            offset = self.shift[self.copy_dst] / ((H + W) / 4)
            x = copy_slots(x, offset, self.copy_dst, self.copy_src, self.fused_kernels)
        norm = self.norm
        weight, bias = norm.weight * self.is_open, norm.bias * self.is_open
        if self.training:
            norm.num_batches_tracked.add_(1)
        if self.training and norm.momentum is None:
            y = self._cumulative_batch_norm(x, weight, bias)
        else:
            y = F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias,
                             self.training, norm.momentum or 0.0, norm.eps)
        return self.conv(F.relu(y, inplace=True))

    def _cumulative_batch_norm(self, x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor) -> torch.Tensor:
        """Training BN with nn.BatchNorm2d's cumulative average (momentum None):
        running ← running + (batch − running) / num_batches_tracked, the factor kept on the
        device (nn.BatchNorm2d reads the count back to the host, a sync per forward on a GPU)."""
        norm = self.norm
        batch_mean = torch.zeros_like(norm.running_mean)
        batch_var = torch.zeros_like(norm.running_var)
        # momentum 1 writes this batch's mean and unbiased variance into the zeroed buffers
        y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, norm.eps)
        factor = norm.num_batches_tracked.reciprocal().to(batch_mean.dtype)
        norm.running_mean.lerp_(batch_mean, factor)
        norm.running_var.lerp_(batch_var, factor)
        return y

    def ecdm(self, normalize: bool = False) -> torch.Tensor:
        """The expected channel damage matrix [O, C] (row-normalised with ``normalize``)."""
        damage = expected_relu(self.norm.weight, self.norm.bias) * self.is_open
        matrix = self.conv.weight.sum((2, 3)) * damage
        if normalize:
            matrix = matrix.abs()
            matrix = matrix / (matrix.sum(1, keepdim=True) + EPS)
        return matrix

    @torch.no_grad()
    def dealloc(self, budget: float) -> None:
        """Close the least damaging channels whose summed damage stays ≤ ``budget`` per output."""
        nrm = self.ecdm(normalize=True)
        order = nrm.max(0).values.sort(stable=True).indices
        # nrm ≥ 0, so the running sums grow along the order: the prefix is a count.
        within = nrm[:, order].cumsum(1).max(0).values <= budget
        closing = order[: int(within.sum())]
        self.is_open[closing] = 0
        self.ptr[closing] = -1
        self.refresh_copies()

    @torch.no_grad()
    def realloc(self, generator: torch.Generator,
                n_max: int | None = None) -> dict[nn.Parameter, torch.Tensor]:
        """Reopen every closed slot as a shifted copy of a top-K channel (K > 0 units only).

        Random draws come from ``generator`` (CPU); returns the edited parameters with boolean
        masks of the edited entries.
        """
        free = (self.is_open == 0).nonzero().flatten()
        if self.K == 0 or free.numel() == 0:
            return {}
        score = self.ecdm(normalize=True).norm(dim=0)
        if n_max is not None:
            score[self._over_copied(n_max)] = 0
        top = score.topk(min(self.K, score.numel())).indices
        pick = torch.randint(top.numel(), (free.numel(),), generator=generator)
        noise = torch.empty(free.numel(), 2).uniform_(-SHIFT_INIT, SHIFT_INIT,
                                                      generator=generator)
        src = top[pick.to(top.device)]

        norm = self.norm
        self.is_open[free] = 1
        self.conv.weight[:, free] = 0
        for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
            tensor[free] = tensor[src]
        self.shift[free] = noise.to(self.shift)
        self.ptr[free] = torch.where(self.ptr[src] >= 0, self.ptr[src], src)
        self.moves += free.numel()
        self.refresh_copies()

        slots = torch.zeros_like(self.is_open, dtype=torch.bool)
        slots[free] = True
        columns = slots.view(1, -1, 1, 1).expand_as(self.conv.weight)
        return {self.conv.weight: columns.clone(), norm.weight: slots, norm.bias: slots.clone(),
                self.shift: slots.unsqueeze(1).expand_as(self.shift).clone()}

    def _over_copied(self, n_max: int) -> torch.Tensor:
        """Channels that are, or copy, an original with more than ``n_max`` copies."""
        copied = self.ptr >= 0
        counts = torch.bincount(self.ptr[copied], minlength=self.in_channels)
        over = counts > n_max
        return over | (copied & over[self.ptr.clamp(min=0)])

    def pruned(self) -> nn.Sequential:
        """Plain BN → ReLU → Conv over the open input channels only (eval mode)."""
        keep = self.is_open.nonzero().flatten()
        norm = nn.BatchNorm2d(keep.numel(), eps=self.norm.eps, momentum=self.norm.momentum)
        conv = _conv_like(self.conv, in_channels=keep.numel())
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name).copy_(getattr(self.norm, name)[keep])
            conv.weight.copy_(self.conv.weight[:, keep])
        return nn.Sequential(norm, nn.ReLU(inplace=True), conv).eval()

    def keep_outputs(self, keep: torch.Tensor) -> None:
        """Drop every output filter but ``keep`` (its consumer no longer reads the others)."""
        conv = _conv_like(self.conv, out_channels=keep.numel())
        with torch.no_grad():
            conv.weight.copy_(self.conv.weight[keep])
        self.conv = conv


def _refresh_after_load(unit: SelectiveConv2d, incompatible_keys) -> None:
    unit.refresh_copies()


def _conv_like(conv: nn.Conv2d, **changes) -> nn.Conv2d:
    spec = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, bias=False, device=conv.weight.device,
                dtype=conv.weight.dtype)
    return nn.Conv2d(**{**spec, **changes})


def selective_units(model: nn.Module) -> Iterator[tuple[str, SelectiveConv2d]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, SelectiveConv2d))


def pruning_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, SelectiveConv2d,
                                                      SelectiveConv2d]]:
    """(parent, name, producer, unit) for every K = 0 unit and the unit feeding it.

    The architectures register a K = 0 unit right after the selective unit whose output is its
    whole input and is read by nothing else (unit1 → unit2 of a dense or bottleneck layer).
    """
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, producer), (name, unit) in zip(children, children[1:]):
            if (isinstance(unit, SelectiveConv2d) and unit.K == 0
                    and isinstance(producer, SelectiveConv2d)):
                yield parent, name, producer, unit


def effective_params(model: nn.Module) -> int:
    """Parameters that still act: without closed channels' BN entries and conv columns, shifts
    of slots that copy nothing, and the filters producing closed channels of K = 0 units."""
    total = sum(p.numel() for p in model.parameters())
    for _, unit in selective_units(model):
        closed = unit.in_channels - int(unit.is_open.sum())
        total -= closed * (2 + unit.conv.weight[:, 0].numel())
        if unit.shift is not None:
            total -= 2 * (unit.in_channels - unit.num_copies)
    for _, _, producer, unit in pruning_pairs(model):
        closed = unit.in_channels - int(unit.is_open.sum())
        total -= closed * producer.conv.weight[0].numel()
    return total


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The same CPU generator on every rank for a given (run seed, epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))


@register_method
class SelectConv(Method):
    """Selective convolution's training hooks.

    gamma: the dealloc damage budget γ; n_max: the most copies an original channel may have
    before it stops being a source (None = unlimited); active_until: the hook runs while
    epoch < active_until · epochs; shift_weight_decay: weight decay of the shifts;
    reset_optimizer_state: zero the optimizer state of re-initialised entries (the authors keep
    it). K is structural, set per unit by the architecture.
    """

    name = "selectconv"

    def __init__(self, gamma: float = 0.001, n_max: int | None = None,
                 active_until: float = 0.5, shift_weight_decay: float = 1e-5,
                 reset_optimizer_state: bool = False):
        if not 0 <= gamma < 1:
            raise ConfigError(f"method.opts.gamma: expected a number in [0, 1), got {gamma!r}")
        if n_max is not None and (isinstance(n_max, bool) or not isinstance(n_max, int)
                                  or n_max < 1):
            raise ConfigError(f"method.opts.n_max: expected an integer >= 1 or null, got {n_max!r}")
        if not 0 <= active_until <= 1:
            raise ConfigError(f"method.opts.active_until: expected a number in [0, 1], "
                              f"got {active_until!r}")
        if shift_weight_decay < 0:
            raise ConfigError(f"method.opts.shift_weight_decay: expected a number >= 0, "
                              f"got {shift_weight_decay!r}")
        if not isinstance(reset_optimizer_state, bool):
            raise ConfigError(f"method.opts.reset_optimizer_state: expected true or false, "
                              f"got {reset_optimizer_state!r}")
        self.gamma = gamma
        self.n_max = n_max
        self.active_until = active_until
        self.shift_weight_decay = shift_weight_decay
        self.reset_optimizer_state = reset_optimizer_state

    def param_groups(self, model: nn.Module) -> list[dict]:
        shifts = [u.shift for _, u in selective_units(model) if u.shift is not None]
        return [{"params": shifts, "weight_decay": self.shift_weight_decay}] if shifts else []

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int,
                     seed: int) -> dict[nn.Parameter, torch.Tensor]:
        if epoch >= self.active_until * epochs:
            return {}
        generator = epoch_generator(seed, epoch)
        edits: dict[nn.Parameter, torch.Tensor] = {}
        for _, unit in selective_units(model):
            unit.dealloc(self.gamma)
            edits.update(unit.realloc(generator, self.n_max))
        return edits

    def metrics(self, model: nn.Module) -> dict[str, float]:
        units = list(selective_units(model))
        if not units:
            raise ValueError("selectconv: the model has no SelectiveConv2d unit "
                             "(build it with method=selectconv)")
        channels = sum(u.in_channels for _, u in units)
        opened = sum(int(u.is_open.sum()) for _, u in units)
        out = {
            "open_fraction": opened / channels,
            "copied": float(sum(u.num_copies for _, u in units)),
            "moved_total": float(sum(int(u.moves) for _, u in units)),
            "pruned_k0": float(sum(u.in_channels - int(u.is_open.sum())
                                   for _, u in units if u.K == 0)),
            "effective_params": float(effective_params(model)),
        }
        out.update({f"open/{name}": float(u.is_open.sum()) for name, u in units})
        return out

    def export(self, model: nn.Module) -> nn.Module:
        """A copy with the closed input channels of K = 0 units and their producers' filters
        removed; K = 0 units become plain BN → ReLU → Conv."""
        exported = copy.deepcopy(model).eval()
        for parent, name, producer, unit in list(pruning_pairs(exported)):
            producer.keep_outputs(unit.is_open.nonzero().flatten())
            setattr(parent, name, unit.pruned())
        return exported
