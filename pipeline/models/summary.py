"""Parameter and MAC counts of exactly the module that trains."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; a parameter shared by several layers counts once."""
    params = list(model.parameters())  # parameters() already yields each tensor once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, channels: int = 3) -> int:
    """Multiply-accumulates of one eval-mode forward at ``input_size``² (FLOPs / 2)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, channels, input_size, input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def summarize(model: nn.Module, input_size: int) -> dict[str, int]:
    params, trainable = count_params(model)
    return {"params": params, "trainable_params": trainable,
            "macs": count_macs(model, input_size), "input_size": input_size}
