"""Associative convolutional layers: one Convolutional Slice Generator (CSG) per network.

Omidvar, Akhlaghi, Su, Franceschetti, Gupta, "Associative Convolutional Layers", AISTATS 2021
(arXiv 1906.04309). A generated convolution stores no kernel, only codes; one bias-free linear
map shared by the whole network turns each code into one slice of kernel values.

**CSG** (``ConvSliceGenerator``): ``weight`` W ∈ R^{S·S·k·k × C}; a code c ∈ R^C gives the slice
``W c`` of S·S·k·k kernel values. Learned: Kaiming-normal init (fan-in C). Binary: W =
0.5·sign(Kaiming-normal draw), frozen, drawn after every other initialisation of the model.

**Generated conv** (``GeneratedConv2d``, C_in → C_out, k×k, groups g, c_in = C_in / g):

    codes ∈ R^{n × C},  n = ⌈c_in/S⌉·⌈C_out/S⌉,  codes ~ N(0, 1)
    flat   = codes Wᵀ                                   (n × S·S·k·k)
    padded = flat.view(⌈C_out/S⌉·S, ⌈c_in/S⌉·S, k, k)   (a plain row-major reshape)
    kernel = padded[:C_out, :c_in]
    y      = conv2d(x, kernel, stride, padding, dilation, g)

A slice is therefore a contiguous run of S·S·k·k entries of the padded kernel flattened row-major
(S/⌈c_in/S⌉ whole output rows when S ≥ ⌈c_in/S⌉), not an S×S block of channels. Codes and CSG
train jointly, with weight decay.

**Dead codes.** The padded kernel has ⌈C_out/S⌉·S − C_out rows (and ⌈c_in/S⌉·S − c_in columns per
row) that the crop discards. A code whose run of entries lies entirely there (e.g. the last of the
4 codes of a 16→16 conv with S = 12: it generates padded rows 18–23) never reaches a kernel: it
gets no gradient from the loss, only weight decay. It is kept because the parameter counts of the
reference include it.

**Kernel generation per step.** ``attach_generator`` registers the CSG once on the model (the
generated convs hold an unregistered reference, so a state_dict holds one copy) and a forward
pre-hook on the model that generates every generated conv's kernel with one matrix product:
``codes_all = cat(live codes of every conv)``, ``flat_all = codes_all Wᵀ``, split by conv. Dead
codes take no part in it. The backward (``_GenerateKernels``) writes every kernel gradient into
one ``grad_flat`` buffer, zero only in the crop padding, and takes ∂codes = grad_flat W and
∂W = grad_flatᵀ codes_all as two products; left to autograd, the per-conv crops, views and the
split each materialised a zero-filled padded gradient and cost three times the products. Each
conv consumes its kernel once; a conv called outside a model forward generates its own.

**Inference** (``materialize``): every kernel is generated once into a plain ``nn.Conv2d``; the
CSG, the codes and the hook are dropped, so the exported model is the baseline architecture.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError

from . import register_method
from .base import Method


class ConvSliceGenerator(nn.Module):
    """The CSG: a bias-free linear map from a code (``code_size``) to one
    [slice_size, slice_size, kernel_size, kernel_size] slice of kernel values."""

    def __init__(self, slice_size: int, kernel_size: int, code_size: int):
        super().__init__()
        for option, value in (("slice", slice_size), ("code", code_size),
                              ("kernel_size", kernel_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"CSG option {option!r} must be a positive integer, "
                                  f"got {value!r}")
        self.slice_size = slice_size
        self.kernel_size = kernel_size
        self.code_size = code_size
        self.weight = nn.Parameter(torch.empty(slice_size * slice_size * kernel_size ** 2,
                                               code_size))
        nn.init.kaiming_normal_(self.weight)
        self.binary = False
        self._convs: list[GeneratedConv2d] = []   # set by attach_generator; not submodules

    @torch.no_grad()
    def binarize_(self) -> None:
        """W = 0.5·sign(Kaiming-normal draw), frozen."""
        nn.init.kaiming_normal_(self.weight)
        self.weight.copy_(torch.where(self.weight >= 0, 0.5, -0.5))  # sign, with sign(0) := +1
        self.weight.requires_grad_(False)
        self.binary = True

    def kernels(self, convs: list[GeneratedConv2d]) -> tuple[torch.Tensor, ...]:
        """The kernels of ``convs`` from one matrix product."""
        return _GenerateKernels.apply(self.weight, convs, *(conv.codes for conv in convs))

    def generate_kernels(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the model: every attached conv's kernel from one matmul."""
        for conv, kernel in zip(self._convs, self.kernels(self._convs)):
            conv.pending_kernel = kernel

    def extra_repr(self) -> str:
        s, k = self.slice_size, self.kernel_size
        return f"slice=[{s},{s},{k},{k}], code={self.code_size}, binary={self.binary}"


class GeneratedConv2d(nn.Module):
    """A convolution whose kernel is generated from ``codes`` by a shared CSG.

    Takes nn.Conv2d's arguments (so it drops into any conv factory) plus the generator; the
    generator is referenced, not registered, so the model registers it once.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = False, *,
                 generator: ConvSliceGenerator):
        super().__init__()
        kernel_size = nn.modules.utils._pair(kernel_size)
        if kernel_size != (generator.kernel_size,) * 2:
            raise ValueError(f"generated conv kernel_size {kernel_size} does not match the CSG "
                             f"slice kernel ({generator.kernel_size}, {generator.kernel_size})")
        if bias:
            raise ValueError("generated convs are bias-free (expected bias=False)")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        s, k = generator.slice_size, generator.kernel_size
        rows = math.ceil(out_channels / s)
        cols = math.ceil(in_channels // groups / s)
        self.padded_shape = (rows * s, cols * s, k, k)
        self.codes = nn.Parameter(torch.randn(rows * cols, generator.code_size))
        # the codes reaching the first C_out padded rows (a prefix); the rest generate only
        # cropped rows and are left out of the product
        self.live_entries = out_channels * cols * s * k * k
        self.live_codes = math.ceil(self.live_entries / (s * s * k * k))
        object.__setattr__(self, "generator", generator)  # bypass submodule registration
        self.pending_kernel: torch.Tensor | None = None

    def _kept_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The first C_out rows of the padded kernel, from the flat slices of the live codes."""
        return flat.view(-1)[: self.live_entries].view(self.out_channels,
                                                       *self.padded_shape[1:])

    def kernel_from(self, flat: torch.Tensor) -> torch.Tensor:
        """Crop of the row-major reshape of the generated slices (live codes only)."""
        return self._kept_rows(flat)[:, : self.in_channels // self.groups]

    def gradient_into(self, grad_flat: torch.Tensor, grad_kernel: torch.Tensor | None) -> None:
        """Write ∂kernel into the live codes' flat slices, zeros wherever the crop discards."""
        c_in = self.in_channels // self.groups
        rows = self._kept_rows(grad_flat)
        if grad_kernel is None:
            rows[:, :c_in].zero_()
        else:
            rows[:, :c_in].copy_(grad_kernel)
        rows[:, c_in:].zero_()
        grad_flat.view(-1)[self.live_entries:].zero_()

    def kernel(self) -> torch.Tensor:
        return self.generator.kernels([self])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, self.pending_kernel = self.pending_kernel, None
        if kernel is None:
            kernel = self.kernel()
        return F.conv2d(x, kernel, None, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def materialize(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=False,
                         device=self.codes.device, dtype=self.codes.dtype)
        conv.weight.copy_(self.kernel())
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, codes={tuple(self.codes.shape)}")


class _GenerateKernels(torch.autograd.Function):
    """flat_all = codes_all Wᵀ over the live codes of ``convs``; one kernel per conv."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, convs: list[GeneratedConv2d],
                *codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes_all = torch.cat([c[: conv.live_codes] for conv, c in zip(convs, codes)])
        flat = F.linear(codes_all, weight)
        ctx.convs = convs
        ctx.save_for_backward(weight, codes_all)
        sizes = [conv.live_codes for conv in convs]
        return tuple(conv.kernel_from(part).contiguous()
                     for conv, part in zip(convs, flat.split(sizes)))

    @staticmethod
    def backward(ctx, *grad_kernels: torch.Tensor | None):
        weight, codes_all = ctx.saved_tensors
        convs = ctx.convs
        grad_flat = weight.new_empty(codes_all.shape[0], weight.shape[0])
        parts = grad_flat.split([conv.live_codes for conv in convs])
        for conv, part, grad_kernel in zip(convs, parts, grad_kernels):
            conv.gradient_into(part, grad_kernel)
        grad_weight = grad_flat.t() @ codes_all if ctx.needs_input_grad[0] else None
        grad_codes = []
        for conv, part in zip(convs, (grad_flat @ weight).split([c.live_codes for c in convs])):
            grad = part.new_zeros(conv.codes.shape)    # dead codes: no gradient
            grad[: conv.live_codes] = part
            grad_codes.append(grad)
        return grad_weight, None, *grad_codes


def generated_convs(model: nn.Module) -> list[GeneratedConv2d]:
    return [m for m in model.modules() if isinstance(m, GeneratedConv2d)]


def attach_generator(model: nn.Module, generator: ConvSliceGenerator,
                     binary: bool = False) -> nn.Module:
    """Register the CSG once as ``model.csg`` and batch kernel generation per forward.

    Call after the model's own initialisation: the binary CSG is drawn here, last.
    """
    convs = generated_convs(model)
    if not convs or any(conv.generator is not generator for conv in convs):
        raise ValueError("attach_generator: every generated conv of the model must use the "
                         "given CSG, and there must be at least one")
    model.csg = generator
    generator._convs = convs
    model.register_forward_pre_hook(generator.generate_kernels)
    if binary:
        generator.binarize_()
    return model


def _is_generation_hook(hook) -> bool:
    return getattr(hook, "__func__", None) is ConvSliceGenerator.generate_kernels


def materialize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every generated conv a plain nn.Conv2d and no CSG."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, GeneratedConv2d):
                setattr(module, child_name, child.materialize())
            elif isinstance(child, ConvSliceGenerator):
                delattr(module, child_name)
        for key, hook in list(module._forward_pre_hooks.items()):
            if _is_generation_hook(hook):
                del module._forward_pre_hooks[key]
    return out


def _state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_report(model: nn.Module) -> dict[str, float]:
    """Parameters and state_dict sizes of the CSG model vs its materialised form (every CSG
    of the model counted, e.g. DeepLab's backbone and ASPP generators)."""
    convs = generated_convs(model)
    generators = {id(c.generator): c.generator for c in convs}.values()
    generated = [c.codes for c in convs] + [g.weight for g in generators]
    generated_ids = {id(t) for t in generated}
    state = model.state_dict(keep_vars=True).values()
    other = [t for t in state if id(t) not in generated_ids]
    kernel_numel = sum(c.out_channels * c.in_channels // c.groups * math.prod(c.kernel_size)
                       for c in convs)
    kernel_bytes = kernel_numel * (generated[0].element_size() if generated else 0)
    rest_params = sum(p.numel() for p in model.parameters() if id(p) not in generated_ids)
    return {
        "generated_params": sum(t.numel() for t in generated),
        "materialized_kernel_params": kernel_numel,
        "params": rest_params + sum(t.numel() for t in generated),
        "materialized_params": rest_params + kernel_numel,
        "codes_csg_mb": _state_bytes(generated) / 1e6,
        "materialized_kernels_mb": kernel_bytes / 1e6,
        "checkpoint_mb": (_state_bytes(other) + _state_bytes(generated)) / 1e6,
        "materialized_checkpoint_mb": (_state_bytes(other) + kernel_bytes) / 1e6,
    }


@register_method
class CSGMethod(Method):
    """Training needs no hooks (codes and CSG are ordinary parameters with weight decay);
    the structural options slice / code / binary are ``model.opts``."""

    name = "csg"

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return storage_report(model)

    def export(self, model: nn.Module) -> nn.Module:
        return materialize(model)
