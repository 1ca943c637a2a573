"""The inference forms a saved model can be exported in, and the graph capture they go through.

A form takes a batch of images ``[N, 3, H, W]`` and returns one tensor: logits ``[N, C]``, or a
segmentation model's ``"out"`` ``[N, C, H, W]`` (``MainOutput``; the auxiliary head is a
training aid). The candidates, in order of preference:

    exported  method.export(trained): folded CE, pruned selective convolution, materialised
              CSG, gated skipping blocks
    trained   the trained model in eval mode: the same outputs at full cost (gated: the masked
              form, whose closed channels are multiplied by 0)

A format takes the first candidate it can capture. ``portable`` switches selective
convolution's fused C++ CPU kernels to their torch-op path (the same values, tested in
test_selectconv): torch.export and TorchScript see through torch ops, not through an
extension's pybind calls. ``capture`` is ``torch.export`` with a dynamic batch dimension; it
refuses Python control flow on data (gated skipping picks channels per image), which is what
makes a traced or ONNX graph safe to run on batches other than the example.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.methods import Method
from pipeline.methods.selectconv import SelectiveConv2d


class MainOutput(nn.Module):
    """The ``"out"`` tensor of a model returning a dict (segmentation)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


@dataclass
class Form:
    name: str            # "exported" | "trained"
    module: nn.Module    # eval mode, CPU, one tensor out


def portable(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, SelectiveConv2d):
            module.fused_kernels = False
    return model


def main_output(output) -> torch.Tensor:
    """A model's output tensor: itself, or a segmentation model's ``"out"``."""
    return output["out"] if isinstance(output, dict) else output


@torch.no_grad()
def _single_output(model: nn.Module, example: torch.Tensor) -> nn.Module:
    return MainOutput(model) if isinstance(model(example), dict) else model


def inference_forms(model: nn.Module, method: Method, exported: bool,
                    example: torch.Tensor) -> list[Form]:
    """The candidate forms of a loaded model: ``model`` is the trained form, or with
    ``exported`` already the method's exported form (exported.pt), the only candidate then."""
    model = model.eval()
    if exported:
        candidates = [("exported", copy.deepcopy(model))]
    else:
        candidates = [("exported", method.export(model)), ("trained", copy.deepcopy(model))]
    return [Form(name, _single_output(portable(m.eval()), example)) for name, m in candidates]


def capture(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` at ``example`` (at least 2 images) with the batch size
    left dynamic."""
    batch = torch.export.Dim("batch")
    # a failed export prints its partial graph (hundreds of lines) to stderr; the exception
    # says why in its first line, which is what the caller reports
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
