"""The copy of selective convolution (``selectconv.py``): channels ``dst`` of x replaced by
channels ``src`` translated by ``offset``, bilinear with border padding (``align_corners=True``).

``copy_slots`` picks the implementation: on CPU fused C++ kernels (``csrc/copy_slots.cpp``,
built at install or on first use) that write the output and, backward, the gradients in one
sweep each (``FusedCopySlots``); on GPU, or without a compiler, the copied channels gathered,
translated in one batched ``grid_sample`` and written back (``CopySlots``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .extensions import cpu_extension


def shift_grid(offset: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The grid_sample grid [n, H, W, 2] sampling channel j at (u + offset[j, 0], v + offset[j, 1]).

    ``offset`` [n, 2] is in normalised coordinates (−1…1 across the image, align_corners=True):
    the identity grid of ``affine_grid([[1, 0, ox], [0, 1, oy]])``, built directly.
    """
    u = torch.linspace(-1, 1, width, dtype=offset.dtype, device=offset.device)
    v = torch.linspace(-1, 1, height, dtype=offset.dtype, device=offset.device)
    identity = torch.stack(torch.broadcast_tensors(u.view(1, width), v.view(height, 1)), -1)
    return identity + offset.view(-1, 1, 1, 2)


_BILINEAR, _BORDER = 0, 1          # grid_sampler_2d's interpolation and padding modes


class CopySlots(torch.autograd.Function):
    """x with channels ``dst`` replaced by channels ``src`` translated by ``offset``.

    The n moved channels are one grid_sample batch (the images as its channels), bilinear,
    border padding. One autograd node instead of gather → translate → scatter, so that the
    backward calls grid_sample's backward once on the saved grid and writes the input gradient
    in one pass (clone, zero ``dst``, add the translated-back gradient at ``src``) rather than
    allocating a zero gradient for the gather (index_add_, slow on CPU along the channels) and
    summing two full-size gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: torch.Tensor, dst: torch.Tensor,
                src: torch.Tensor) -> torch.Tensor:
        # channel-major [n, N, H, W] and contiguous: grid_sample's backward is ~25% faster
        source = x.transpose(0, 1).index_select(0, src)
        grid = shift_grid(offset, *x.shape[-2:]).to(x.dtype)
        moved = torch.grid_sampler_2d(source, grid, _BILINEAR, _BORDER, True)
        ctx.save_for_backward(source, grid, dst, src)
        ctx.offset_dtype = offset.dtype
        return x.index_copy(1, dst, moved.transpose(0, 1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        source, grid, dst, src = ctx.saved_tensors
        need_x, need_offset = ctx.needs_input_grad[:2]
        grad_source, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad.transpose(0, 1).index_select(0, dst), source, grid, _BILINEAR, _BORDER, True,
            [need_x, need_offset])
        grad_x = _scatter_sum(grad.index_fill(1, dst, 0), src, grad_source) if need_x else None
        grad_offset = grad_grid.sum((1, 2)).to(ctx.offset_dtype) if need_offset else None
        return grad_x, grad_offset, None, None


class FusedCopySlots(torch.autograd.Function):
    """``CopySlots`` through the fused CPU kernels of ``csrc/copy_slots.cpp``: the same values,
    each pass one sweep over memory (no gathered, sampled and scattered intermediates).

    The backward reads the source channels from the output, where they are unchanged (a source
    is never a copied slot), so nothing beyond what the following BN keeps is saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: torch.Tensor, dst: torch.Tensor,
                src: torch.Tensor) -> torch.Tensor:
        out = cpu_extension("copy_slots").forward(x, offset, dst, src)
        ctx.save_for_backward(out, offset, dst, src)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, offset, dst, src = ctx.saved_tensors
        grad_x, grad_offset = cpu_extension("copy_slots").backward(
            grad, out, offset, dst, src, *ctx.needs_input_grad[:2])
        return grad_x, grad_offset, None, None


def copy_slots(x: torch.Tensor, offset: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
               fused: bool = True) -> torch.Tensor:
    """x with channels ``dst`` replaced by channels ``src`` translated by ``offset``: the fused
    kernels on CPU (unless ``fused`` is False), grid_sample elsewhere."""
    if fused and x.device.type == "cpu" and cpu_extension("copy_slots") is not None:
        return FusedCopySlots.apply(x, offset, dst, src)
    return CopySlots.apply(x, offset, dst, src)


def _scatter_sum(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[:, index[j]] += values[j] (repeated indices summed), in place; ``values`` is
    channel-major [n, N, H, W].

    ``out.index_add_(1, index, values.transpose(0, 1))`` off the CPU. Its CPU kernel along dim 1
    costs about as much as the rest of a 1×1 unit's step, so on the CPU the repeats are summed
    by one matrix product with a one-hot matrix and the few distinct channels written back with
    index_copy_ (``unique`` reads its output size back to the host: a sync per step on a GPU).
    """
    if out.device.type != "cpu":
        return out.index_add_(1, index, values.transpose(0, 1))
    distinct, inverse = index.unique(return_inverse=True)
    onehot = F.one_hot(inverse, distinct.numel()).to(values.dtype)
    summed = (onehot.t() @ values.flatten(1)).view(-1, *values.shape[1:]).transpose(0, 1)
    return out.index_copy_(1, distinct, out.index_select(1, distinct) + summed)
