"""The file formats of ``pipeline export``: how a form is written, and how the written file is
run again to check it.

    torchscript  torch.jit.script of the form where it scripts (its Python control flow kept),
                 else torch.jit.trace of its torch.export graph (``forms.capture``)
    onnx         the dynamo exporter on the same torch.export graph; checked with onnx.checker
                 and run with onnxruntime (CPU)
    state_dict   exported.pt (``engine.artifacts``): the exported state_dict, the config, the
                 class names and the trained buffers; run through ``artifacts.load_saved``

Every file takes ``images`` float32 ``[N, 3, H, W]`` (any N; H, W of the example) and returns
one float32 tensor (``forms``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.engine import artifacts

from .forms import capture, main_output

FORMATS = ("torchscript", "onnx", "state_dict")
INPUT, OUTPUT = "images", "output"


def write_torchscript(module: nn.Module, example: torch.Tensor, out: Path) -> str:
    """Write ``module`` as TorchScript; returns how it was captured."""
    try:
        scripted, how = torch.jit.script(module), "script"
    except Exception:  # TorchScript's compiler raises many kinds; tracing is the fallback
        with torch.no_grad():
            scripted = torch.jit.trace(capture(module, example).module(), (example,),
                                       check_trace=False)
        how = "trace of torch.export"
    torch.jit.save(scripted, str(out))
    return how


def write_onnx(module: nn.Module, example: torch.Tensor, out: Path) -> str:
    import onnx

    program = capture(module, example)
    torch.onnx.export(program, (example,), str(out), dynamo=True, input_names=[INPUT],
                      output_names=[OUTPUT], external_data=False, verbose=False)
    onnx.checker.check_model(str(out), full_check=True)
    return "torch.export → onnx"


def run_file(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the written file on a batch, as a user of that format would."""
    if fmt == "torchscript":
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
        return lambda images: _no_grad(scripted, images)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(
            session.run([OUTPUT], {INPUT: np.ascontiguousarray(images.numpy())})[0])
    saved = artifacts.load_saved(path)
    return lambda images: _no_grad(saved.model, images)


def _no_grad(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(images))
