"""Parameter and MAC counts of exactly the module that trains."""
from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

# an int for a square image, or (height, width)
InputSize = int | tuple[int, int]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; a parameter shared by several layers counts once."""
    params = list(model.parameters())  # parameters() already yields each tensor once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def height_width(input_size: InputSize) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: InputSize, channels: int = 3) -> int:
    """Multiply-accumulates of one eval-mode forward of one image of ``input_size`` (FLOPs / 2).

    The forward runs on fake tensors (shapes and devices, no data), the model's parameters and
    buffers swapped for fakes of them: counting a segmentation model at 1024×2048 costs no
    arithmetic and no activation memory. (Not the meta device: CE's autocast guard rejects it.)
    The model may return a tensor or a dict of them.
    """
    height, width = height_width(input_size)
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = {name: mode.from_tensor(t) for name, t in tensors.items()}
    was_training = model.training
    model.eval()
    try:
        with mode, FlopCounterMode(display=False) as counter:
            functional_call(model, fakes,
                            (torch.zeros(1, channels, height, width, device=device),))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def summarize(model: nn.Module, input_size: InputSize) -> dict:
    params, trainable = count_params(model)
    size = input_size if isinstance(input_size, int) else list(input_size)
    return {"params": params, "trainable_params": trainable,
            "macs": count_macs(model, input_size), "input_size": size}
