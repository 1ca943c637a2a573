"""Channel Equilibrium (Shao et al., ICML 2020; reference: github Tangshitao/CENet).

A CE block follows a BN (after its affine). Its input ``x`` (N, C, H, W) is split into
``groups = C / d`` contiguous channel groups; ``L = H·W`` and ``m = N·L``.

    Y = lam · BD(x) + (1 − lam) · IR(x),        lam = sigmoid(theta),   theta₀ = 0

Batch decorrelation (BD), per group Z ∈ R^{d×m} (per process, no cross-rank sync):

    mu      = mean(Z)                             sigma = (1/m)(Z − mu)(Z − mu)ᵀ + eps·I
    sigma_n = sigma / tr(sigma)                    P₀ = I,  P_{k+1} = 1.5·P_k − 0.5·P_k³·sigma_n
    whiten  = P_T  (× tr(sigma)^−½ only with trace_rescale; the reference does not rescale)
    BD(x)   = whiten · Z        on the UNCENTRED Z;     eval: running_whiten
    running_whiten ← (1 − momentum)·running_whiten + momentum·whiten        (starts at I)

Instance reweighting (IR):

    s2[n, c] = unbiased variance of x[n, c] over H·W
    gate     = sigmoid(w2 · ReLU(LayerNorm(w1 · s2)))        w1: C → C/4, w2: C/4 → C, no bias
    kappa    = sqrt(mean_{n,c} s2)  (training, not detached);   eval: running_kappa
    IR(x)    = x ⊙ gate / kappa
    running_kappa ← (1 − momentum)·running_kappa + momentum·kappa              (starts at 0)

Both branches are channel maps of x, so the block is one per-sample block-diagonal map

    Y[n, g] = mix[n, g] · Z[n, g],   mix[n, g] = lam·whiten[g] + (1 − lam)·diag(gate[n, g] / kappa)

which is how it is computed: every statistic comes from two reductions of x, the per-sample
channel sums ``s1[n, c] = Σ_L x`` and Gram matrices ``gram[n, g] = Z[n, g] Z[n, g]ᵀ``, so that
mu = Σ_n s1 / m, sigma = Σ_n gram / m − mu muᵀ + eps·I, s2 = (diag gram − s1²/L) / (L − 1).
A custom autograd function (``_ChannelMix``) runs the full-size work (the two reductions and
the mix) in three passes over x, saves only x, and differentiates the small statistics graph
(gram, s1 → mix) with autograd inside its backward. Statistics and iterations run in fp32 under
autocast. Evaluation before any training step (running_kappa still 0) uses kappa = 1.

The iteration is the reference's uncoupled form; it amplifies rounding errors (the iterates
drift from symmetric), so beyond roughly 10–12 steps it diverges on ill-conditioned groups:
``iterations`` well above 3 is for studying whitening on small, well-conditioned inputs.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.config import ConfigError

from . import register_method
from .base import Method


def group_size_for(channels: int, d: int) -> int:
    """The reference's group size: ``d`` halved until it divides ``channels``."""
    if d < 1:
        raise ConfigError(f"CE group size must be a positive integer, got {d}")
    while channels % d:
        d //= 2
    return d


def newton_schulz_whitening(sigma: torch.Tensor, iterations: int,
                            trace_rescale: bool) -> torch.Tensor:
    """``P_T`` for a batch of covariances (…, d, d): the iterative inverse square root of the
    trace-normalised ``sigma``; ``trace_rescale`` multiplies by tr(sigma)^−½ (full whitening)."""
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    sigma_n = sigma / trace
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    p = eye.expand_as(sigma)
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * (p @ p @ p) @ sigma_n
    return p * trace.rsqrt() if trace_rescale else p


class _ChannelMix(torch.autograd.Function):
    """Y[n, g] = mix(s1, gram)[n, g] · Z[n, g] in three passes over x, saving only x.

    ``mix_of_stats(s1, gram, L) -> mix`` is the small differentiable graph (statistics → per-sample
    block-diagonal map, with the block's parameters); its ``params`` are passed so that autograd
    routes their gradients through this function. ``source``, when given, is ``(x_in, scale,
    shift)`` with x = x_in·scale + shift per channel (x the output of a BN that already saved
    its input x_in): backward then recomputes z from x_in instead of keeping a second copy.
    The result is written into a fresh tensor of ``out_shape`` (x's shape), not returned as a
    view of Y: the in-place ReLU after every CE in a ResNet would otherwise make autograd
    rebuild the whole gradient through CopySlices (two full-size copies per block, ~8% of a
    resnet50 step).
    """

    @staticmethod
    def forward(ctx, z, source, out_shape, mix_of_stats, *params):
        length = z.shape[-1]
        s1 = z.sum(-1)
        gram = z @ z.transpose(-1, -2)
        with torch.enable_grad():
            s1_leaf = s1.detach().requires_grad_()
            gram_leaf = gram.detach().requires_grad_()
            mix = mix_of_stats(s1_leaf, gram_leaf, length)
        ctx.save_for_backward(*(source or (z,)))
        ctx.z_shape = z.shape
        ctx.graph = (s1_leaf, gram_leaf, mix, params)
        y = z.new_empty(out_shape)
        torch.matmul(mix.detach(), z, out=y.view(z.shape))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_y = grad_y.reshape(ctx.z_shape)
        saved = ctx.saved_tensors
        z = saved[0] if len(saved) == 1 else _affine(*saved, grad_y.dtype).view(ctx.z_shape)
        s1_leaf, gram_leaf, mix, params = ctx.graph
        grad_mix = grad_y @ z.transpose(-1, -2)
        inputs = (s1_leaf, gram_leaf, *[p for p in params if p.requires_grad])
        # retain_graph: the small graph lives as long as this node, so a retained outer graph
        # (gradcheck, double backward through the rest) can run backward again
        grads = torch.autograd.grad(mix, inputs, grad_mix, allow_unused=True, retain_graph=True)
        grad_s1, grad_gram = grads[:2]
        param_grads = iter(grads[2:])
        # dL/dz through mix·z, the Gram matrix and the sums, accumulated in place into one
        # full-size tensor (baddbmm_ is a GEMM with beta = 1) instead of three summed ones.
        grad_z = torch.matmul(mix.detach().transpose(-1, -2), grad_y)
        sym = grad_gram + grad_gram.transpose(-1, -2)
        grad_z.flatten(0, 1).baddbmm_(sym.flatten(0, 1), z.flatten(0, 1))
        grad_z.add_(grad_s1[..., None])
        return (grad_z, None, None, None,
                *[next(param_grads) if p.requires_grad else None for p in params])


def _affine(x_in: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """x_in·scale + shift per channel (dim 1), computed in ``dtype``."""
    shape = (1, -1) + (1,) * (x_in.dim() - 2)
    return torch.addcmul(shift.to(dtype).view(shape), x_in.to(dtype), scale.to(dtype).view(shape))


def batch_norm_source(bn: nn.BatchNorm2d, x: torch.Tensor) -> tuple | None:
    """``(x_in, scale, shift)`` with x = x_in·scale + shift, for the output ``x`` of a
    training-mode ``bn``, read from the statistics its autograd node saved; None when the node
    is not the native CPU/CUDA batch norm (e.g. cuDNN, SyncBatchNorm) or x has no graph."""
    node = x.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0" or not node._saved_training:
        return None
    scale = node._saved_result2.detach()
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -node._saved_result1.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return node._saved_input, scale, shift


class InstanceGate(nn.Module):
    """gate = sigmoid(w2 · ReLU(LayerNorm(w1 · s2))): the reference's ``AdaptiveReweight.fc``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = channels // reduction
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.LayerNorm(hidden),
                                nn.ReLU(inplace=True), nn.Linear(hidden, channels, bias=False),
                                nn.Sigmoid())

    def forward(self, s2: torch.Tensor) -> torch.Tensor:
        squeeze, norm, relu, excite, sigmoid = self.fc
        return sigmoid(excite(relu(_layer_norm(squeeze(s2), norm))))


def _layer_norm(h: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(h)`` in composite ops: aten's CPU LayerNorm kernel takes tens of milliseconds
    on these tiny (N, C/4) inputs when threads are contended (measured: 70 ms vs 1.4 ms)."""
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return (h - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias


class ChannelEquilibrium(nn.Module):
    """The CE block (see the module docstring). ``group_size`` is d before halving."""

    def __init__(self, channels: int, group_size: int = 16, iterations: int = 3,
                 trace_rescale: bool = False, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if iterations < 0:
            raise ConfigError(f"CE iterations (T) must be a non-negative integer, got {iterations}")
        self.channels = channels
        self.d = group_size_for(channels, group_size)
        self.groups = channels // self.d
        self.iterations = iterations
        self.trace_rescale = trace_rescale
        self.eps = eps
        self.momentum = momentum
        self.gate = InstanceGate(channels)
        self.theta = nn.Parameter(torch.zeros(1))
        self.register_buffer("running_whiten", torch.eye(self.d).repeat(self.groups, 1, 1))
        self.register_buffer("running_kappa", torch.zeros(1))

    def extra_repr(self) -> str:
        return (f"{self.channels}, d={self.d}, groups={self.groups}, T={self.iterations}, "
                f"trace_rescale={self.trace_rescale}")

    def forward(self, x: torch.Tensor, source: tuple | None = None) -> torch.Tensor:
        """``source``: see ``_ChannelMix`` (saves memory in training; the result is the same)."""
        n, c, h, w = x.shape
        if h * w < 2:
            raise ConfigError(f"CE needs at least 2 spatial positions per channel, got {h}×{w}")
        with torch.autocast(x.device.type, enabled=False):
            # fp16/bf16 activations are promoted; fp32 and fp64 stay as they are (no copy)
            z = x.to(torch.promote_types(x.dtype, torch.float32))
            z = z.view(n, self.groups, self.d, h * w)
            if self.training:
                params = tuple(self.gate.parameters()) + (self.theta,)
                y = _ChannelMix.apply(z, source, (n, c, h, w), self._mix_of_stats, *params)
            else:
                y = (self._eval_mix(z) @ z).view(n, c, h, w)
        return y.to(x.dtype)

    def _mix_of_stats(self, s1: torch.Tensor, gram: torch.Tensor, length: int) -> torch.Tensor:
        """Training: the per-sample map from the two reductions; updates the running values."""
        m = s1.shape[0] * length
        mu = s1.sum(0) / m
        eye = torch.eye(self.d, dtype=gram.dtype, device=gram.device)
        sigma = gram.sum(0) / m - mu[..., :, None] * mu[..., None, :] + self.eps * eye
        whiten = newton_schulz_whitening(sigma, self.iterations, self.trace_rescale)
        s2 = (gram.diagonal(dim1=-2, dim2=-1) - s1 * s1 / length) / (length - 1)
        kappa = s2.mean().sqrt()
        with torch.no_grad():
            self.running_whiten.lerp_(whiten.detach(), self.momentum)
            self.running_kappa.lerp_(kappa.detach().view(1), self.momentum)
        return self._mix(whiten, s2, kappa)

    def _eval_mix(self, z: torch.Tensor) -> torch.Tensor:
        s2 = z.var(-1)
        kappa = torch.where(self.running_kappa > 0, self.running_kappa,
                            torch.ones_like(self.running_kappa))
        return self._mix(self.running_whiten, s2, kappa)

    def _mix(self, whiten: torch.Tensor, s2: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        """lam·whiten + (1 − lam)·diag(gate / kappa), per sample and group."""
        n = s2.shape[0]
        gate = self.gate(s2.reshape(n, self.channels)).view(n, self.groups, self.d)
        lam = torch.sigmoid(self.theta)
        return lam * whiten + torch.diag_embed((1 - lam) * gate / kappa)


class NormCE(nn.Sequential):
    """BN → CE, put where the BN was so that the enclosing block's forward is unchanged.

    In training the CE recomputes its input from the BN's saved input and statistics in
    backward rather than saving it (one more pass, one activation fewer per block)."""

    def __init__(self, bn: nn.BatchNorm2d, **ce_opts):
        super().__init__(OrderedDict(bn=bn, ce=ChannelEquilibrium(bn.num_features, **ce_opts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        source = batch_norm_source(self.bn, x) if self.ce.training else None
        return self.ce(x, source)


class ExportedCE(nn.Module):
    """Inference form of ``NormCE``: ``norm`` (the eval BN, or Identity once folded into the
    preceding conv), BD as a fixed grouped 1×1 conv of weight lam·running_whiten, and IR with
    the constant (1 − lam) / running_kappa folded into one scale."""

    def __init__(self, norm_ce: NormCE, norm: nn.Module):
        super().__init__()
        ce = norm_ce.ce
        lam = torch.sigmoid(ce.theta.detach())
        self.norm = norm
        self.bd = nn.Conv2d(ce.channels, ce.channels, 1, groups=ce.groups, bias=False)
        self.bd.weight.data.copy_((lam * ce.running_whiten).reshape(ce.channels, ce.d, 1, 1))
        self.gate = InstanceGate(ce.channels)
        self.gate.load_state_dict(ce.gate.state_dict())
        kappa = ce.running_kappa if ce.running_kappa.item() > 0 else \
            torch.ones_like(ce.running_kappa)
        self.register_buffer("ir_scale", (1 - lam) / kappa)
        self.to(ce.theta.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        gate = self.gate(x.flatten(2).var(-1)) * self.ir_scale
        return self.bd(x) + x * gate[..., None, None]


def _preceding_conv(parent: nn.Module, name: str) -> str | None:
    """The name of the conv feeding child ``name`` of ``parent``: the previous element of a
    Sequential, or ``convK`` for a ResNet block's ``bnK``; None when there is none."""
    names = list(parent._modules)
    if isinstance(parent, nn.Sequential):
        index = names.index(name)
        candidate = names[index - 1] if index else None
    else:
        candidate = "conv" + name[2:] if name.startswith("bn") else None
    if candidate is None or type(parent._modules.get(candidate)) is not nn.Conv2d:
        return None
    return candidate


def export_ce(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every ``NormCE`` replaced by ``ExportedCE``, its BN
    folded into the preceding conv where that conv feeds only this BN."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, NormCE):
                continue
            conv_name = _preceding_conv(parent, name)
            if conv_name is None:
                norm = child.bn
            else:
                fused = fuse_conv_bn_eval(parent._modules[conv_name], child.bn)
                parent._modules[conv_name] = fused
                norm = nn.Identity()
            parent._modules[name] = ExportedCE(child, norm)
    return model


@register_method
class ChannelEquilibriumMethod(Method):
    """CE adds no losses or schedules: its layers are placed by the ``ce`` model builders."""

    name = "ce"

    def metrics(self, model: nn.Module) -> dict[str, float]:
        lams = [torch.sigmoid(m.theta.detach()).item()
                for m in model.modules() if isinstance(m, ChannelEquilibrium)]
        if not lams:
            return {}
        return {"lambda_mean": sum(lams) / len(lams), "lambda_min": min(lams),
                "lambda_max": max(lams)}

    def export(self, model: nn.Module) -> nn.Module:
        return export_ce(model)
